"""Small synthetic datasets in the exact on-disk layouts of ADE20K, COCO and ImageNet.

Each class has its own colour and texture and objects have class-typical shapes, so a model
can learn them in a few hundred iterations. Everything is drawn from one seed.

    ade/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*_%08d.{jpg,png}
    coco/{train2017,val2017}/%012d.jpg, coco/annotations/instances_{train,val}2017.json
    imagenet/{train,val}/<class>/<class>_%05d.jpg
"""
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Dict, List, Tuple

import cv2
import numpy as np
from mmengine.utils import track_iter_progress

# ADE20K: label in the PNG = 1 + index in mmseg's ADE20KDataset classes (0 = unlabelled).
ADE_STUFF = ('wall', 'sky', 'floor')
ADE_THINGS = ('person', 'car', 'tree')
# COCO categories drawn, with their official ids.
COCO_THINGS = {'person': 1, 'car': 3, 'dog': 18, 'sports ball': 37}
SHAPES = {'person': 'ellipse', 'car': 'rectangle', 'tree': 'triangle', 'dog': 'triangle',
          'sports ball': 'circle'}
COLOURS = {'wall': (150, 150, 150), 'sky': (235, 200, 130), 'floor': (40, 90, 140),
           'person': (60, 60, 220), 'car': (200, 80, 30), 'tree': (40, 160, 40),
           'dog': (30, 140, 200), 'sports ball': (20, 200, 230)}
TEXTURES = {'wall': 'hstripes', 'sky': 'flat', 'floor': 'checker', 'person': 'vstripes',
            'car': 'checker', 'tree': 'dots', 'dog': 'dots', 'sports ball': 'flat'}


def _texture(kind: str, shape: Tuple[int, int], phase: int) -> np.ndarray:
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    pattern = {'flat': np.zeros((h, w)),
               'hstripes': ((y + phase) // 3) % 2,
               'vstripes': ((x + phase) // 3) % 2,
               'checker': (((x + phase) // 4) + (y // 4)) % 2,
               'dots': (((x + phase) % 5 < 2) & (y % 5 < 2))}[kind]
    return pattern.astype(np.float32)


def _paint(image: np.ndarray, mask: np.ndarray, name: str, rng: np.random.Generator) -> None:
    texture = _texture(TEXTURES[name], mask.shape, int(rng.integers(0, 8)))
    colour = np.array(COLOURS[name], np.float32)
    shade = colour[None, None] * (0.75 + 0.5 * texture[..., None])
    image[mask] = np.clip(shade[mask], 0, 255).astype(np.uint8)


def _shape_mask(shape: str, size: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    bh, bw = int(rng.integers(h // 5, h // 2)), int(rng.integers(w // 5, w // 2))
    if shape == 'ellipse':
        bw = max(bw // 2, 4)
    cy, cx = int(rng.integers(bh // 2, h - bh // 2)), int(rng.integers(bw // 2, w - bw // 2))
    if shape == 'rectangle':
        cv2.rectangle(mask, (cx - bw // 2, cy - bh // 3), (cx + bw // 2, cy + bh // 3), 1, -1)
    elif shape == 'ellipse':
        cv2.ellipse(mask, (cx, cy), (bw // 2, bh // 2), 0, 0, 360, 1, -1)
    elif shape == 'circle':
        cv2.circle(mask, (cx, cy), min(bh, bw) // 2, 1, -1)
    else:
        pts = np.array([[cx, cy - bh // 2], [cx - bw // 2, cy + bh // 2],
                        [cx + bw // 2, cy + bh // 2]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


@contextmanager
def _fresh_folder(path: str, overwrite: bool):
    """Build into a temporary sibling and move it into place only once complete."""
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f'{path!r} exists and is not empty; pass overwrite=True '
                              '(--overwrite) to replace it')
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # a unique name made with mkdir, so the folder gets a plain mkdir's permissions
    tmp = os.path.join(parent, f'.tmp-{os.path.basename(path)}-{uuid.uuid4().hex}')
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def ade20k_scene(rng: np.random.Generator, size: Tuple[int, int]):
    """One image (H, W, 3 BGR) and its ADE20K label map (1 + class index, 0 unlabelled)."""
    from mmseg.datasets import ADE20KDataset
    classes = ADE20KDataset.METAINFO['classes']
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    label = np.zeros((h, w), np.uint8)
    sky_end, floor_start = int(rng.integers(h // 5, h // 3)), int(rng.integers(2 * h // 3, h))
    rows = np.arange(h)[:, None].repeat(w, 1)
    regions = {'sky': rows < sky_end, 'wall': (rows >= sky_end) & (rows < floor_start),
               'floor': rows >= floor_start}
    for name in ADE_STUFF:
        _paint(image, regions[name], name, rng)
        label[regions[name]] = classes.index(name) + 1
    for _ in range(int(rng.integers(1, 4))):
        name = ADE_THINGS[int(rng.integers(len(ADE_THINGS)))]
        mask = _shape_mask(SHAPES[name], size, rng)
        _paint(image, mask, name, rng)
        label[mask] = classes.index(name) + 1
    label[:2, :2] = 0  # a few unlabelled pixels, as in the real data
    return image, label


def _progress(items, show: bool):
    return track_iter_progress(list(items)) if show else items


def make_ade20k(root: str, num_train: int = 16, num_val: int = 8,
                size: Tuple[int, int] = (128, 128), seed: int = 0,
                overwrite: bool = False, progress: bool = True) -> str:
    """Write a small ADE20K under ``root``; returns the ``data_root`` mmseg configs use."""
    data_root = os.path.join(root, 'ade', 'ADEChallengeData2016')
    rng = np.random.default_rng(seed)
    with _fresh_folder(data_root, overwrite) as tmp:
        for split, prefix, count in (('training', 'ADE_train', num_train),
                                     ('validation', 'ADE_val', num_val)):
            for d in ('images', 'annotations'):
                os.makedirs(os.path.join(tmp, d, split))
            for i in _progress(range(1, count + 1), progress):
                image, label = ade20k_scene(rng, size)
                name = f'{prefix}_{i:08d}'
                cv2.imwrite(os.path.join(tmp, 'images', split, name + '.jpg'), image,
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
                cv2.imwrite(os.path.join(tmp, 'annotations', split, name + '.png'), label)
    return data_root


def coco_categories() -> List[Dict]:
    """All 80 COCO categories with their official ids, as in instances_*.json."""
    from mmdet.datasets import CocoDataset
    from pycocotools.coco import COCO  # noqa: F401  (the reader the dataset uses)
    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
           25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49,
           50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74,
           75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]
    return [dict(id=i, name=n, supercategory='thing')
            for i, n in zip(ids, CocoDataset.METAINFO['classes'])]


def coco_image(rng: np.random.Generator, size: Tuple[int, int], image_id: int,
               next_ann_id: int):
    """One image (H, W, 3 BGR) and its COCO instance annotations (polygons)."""
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    _paint(image, np.ones((h, w), bool), 'wall', rng)
    annotations = []
    names = list(COCO_THINGS)
    occupied = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        name = names[int(rng.integers(len(names)))]
        mask = _shape_mask(SHAPES[name], size, rng) & ~occupied
        if mask.sum() < 16:
            continue
        occupied |= mask
        _paint(image, mask, name, rng)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        polygons = [c.flatten().astype(float).tolist() for c in contours if len(c) >= 3]
        if not polygons:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0 = float(xs.min()), float(ys.min())
        annotations.append(dict(
            id=next_ann_id + len(annotations), image_id=image_id,
            category_id=COCO_THINGS[name], segmentation=polygons, area=float(mask.sum()),
            bbox=[x0, y0, float(xs.max()) - x0 + 1, float(ys.max()) - y0 + 1], iscrowd=0))
    return image, annotations


def make_coco(root: str, num_train: int = 16, num_val: int = 8,
              size: Tuple[int, int] = (96, 128), seed: int = 0,
              overwrite: bool = False, progress: bool = True) -> str:
    """Write a small COCO 2017 under ``root``; returns the ``data_root`` mmdet configs use."""
    data_root = os.path.join(root, 'coco')
    rng = np.random.default_rng(seed)
    categories = coco_categories()
    with _fresh_folder(data_root, overwrite) as tmp:
        os.makedirs(os.path.join(tmp, 'annotations'))
        image_id, ann_id = 1, 1
        for split, count in (('train2017', num_train), ('val2017', num_val)):
            os.makedirs(os.path.join(tmp, split))
            images, annotations = [], []
            for _ in _progress(range(count), progress):
                image, anns = coco_image(rng, size, image_id, ann_id)
                file_name = f'{image_id:012d}.jpg'
                cv2.imwrite(os.path.join(tmp, split, file_name), image,
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
                images.append(dict(id=image_id, file_name=file_name, height=size[0],
                                   width=size[1]))
                annotations += anns
                image_id, ann_id = image_id + 1, ann_id + len(anns)
            with open(os.path.join(tmp, 'annotations', f'instances_{split}.json'), 'w') as f:
                json.dump(dict(images=images, annotations=annotations,
                               categories=categories), f)
    return data_root


IMAGENET_CLASSES = ('person', 'car', 'tree', 'dog', 'sports ball')


def imagenet_image(rng: np.random.Generator, size: Tuple[int, int], name: str) -> np.ndarray:
    """One object of class ``name`` over a random stuff background (sky, wall or floor)."""
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    _paint(image, np.ones((h, w), bool), ADE_STUFF[int(rng.integers(len(ADE_STUFF)))], rng)
    for _ in range(int(rng.integers(1, 3))):
        _paint(image, _shape_mask(SHAPES[name], size, rng), name, rng)
    return image


def make_imagenet(root: str, num_train: int = 40, num_val: int = 10,
                  size: Tuple[int, int] = (64, 64), seed: int = 0,
                  overwrite: bool = False, progress: bool = True) -> str:
    """Write a small ImageNet-layout classification set (per-class folders) under ``root``.

    ``num_train`` and ``num_val`` are images per class. Returns the ``data_root``.
    """
    data_root = os.path.join(root, 'imagenet')
    rng = np.random.default_rng(seed)
    with _fresh_folder(data_root, overwrite) as tmp:
        for split, count in (('train', num_train), ('val', num_val)):
            for name in _progress(list(IMAGENET_CLASSES), progress):
                folder = os.path.join(tmp, split, name.replace(' ', '_'))
                os.makedirs(folder)
                for i in range(count):
                    cv2.imwrite(os.path.join(folder, f'{i:05d}.jpg'),
                                imagenet_image(rng, size, name), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return data_root
