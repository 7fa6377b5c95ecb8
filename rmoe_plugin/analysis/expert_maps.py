"""Which expert each image patch goes to: per-token top-1 assignments drawn over the image.

A Swin stage s sees the (padded) network input as a grid of ``ceil(H / 2^(s+2)) x
ceil(W / 2^(s+2))`` tokens (4x4 patches, halved by each patch merging); a ViT or BEiT one of
``ceil(H / 16) x ceil(W / 16)`` patches after a cls token, CvT's last stage likewise. The grid
of a layer is recovered from its token count and the input's size, so no knowledge of the
backbone is needed; leading tokens that belong to no patch (cls and register tokens) are left
out of the map.
"""
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dataset import Compose
from torch import nn

from ..fileio import atomic_write
from ..moe import MoEFeedForward

Grid = Tuple[int, int, Optional[int]]
OUTPUT_FILES = dict(maps='expert_maps.png', load='expert_load.png')


def inference_pipeline(cfg: Config) -> Compose:
    """The config's test pipeline without its annotation loaders (images come alone)."""
    dataset = cfg.test_dataloader.dataset
    while 'pipeline' not in dataset and ('dataset' in dataset or 'datasets' in dataset):
        dataset = dataset.get('dataset') or dataset.datasets[0]
    pipeline = dataset.get('pipeline', cfg.get('test_pipeline'))
    if not pipeline:
        raise ValueError('the config has no test pipeline (test_dataloader.dataset.pipeline)')
    return Compose([t for t in pipeline if 'Annotation' not in t['type']])


def token_grid(num_tokens: int, input_hw: Tuple[int, int]) -> Grid:
    """The (rows, cols, stride) grid that ``num_tokens`` tokens of an ``input_hw`` input form.

    Tries the strides of a patch-merging backbone (``ceil(H / s) x ceil(W / s)`` for s a power
    of two); failing that, the factor pair of ``num_tokens`` closest to the input's aspect,
    with stride None.

    Raises:
        ValueError: ``num_tokens`` or the input size is not positive.
    """
    height, width = input_hw
    if num_tokens < 1 or height < 1 or width < 1:
        raise ValueError(f'num_tokens ({num_tokens}) and input_hw ({input_hw}) must be positive')
    for power in range(16):
        stride = 2 ** power
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        if rows * cols == num_tokens:
            return rows, cols, stride
        if rows * cols < num_tokens:
            break
    pairs = [(d, num_tokens // d) for d in range(1, num_tokens + 1) if num_tokens % d == 0]
    rows, cols = min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - math.log(height / width)))
    return rows, cols, None


MAX_PREFIX_TOKENS = 8


def prefix_tokens(num_tokens: int, input_hw: Tuple[int, int]) -> int:
    """How many leading tokens (cls, registers) precede the patch grid of ``num_tokens``.

    The fewest, 0 to ``MAX_PREFIX_TOKENS``, after which the rest form a power-of-two stride
    grid of the input (see :func:`token_grid`); 0 when none does.
    """
    for prefix in range(min(MAX_PREFIX_TOKENS, num_tokens - 1) + 1):
        if token_grid(num_tokens - prefix, input_hw)[2] is not None:
            return prefix
    return 0


def nearest_resize(labels: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (no interpolation between expert ids)."""
    rows = np.minimum((np.arange(out_hw[0]) + 0.5) * labels.shape[0] / out_hw[0],
                      labels.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(out_hw[1]) + 0.5) * labels.shape[1] / out_hw[1],
                      labels.shape[1] - 1).astype(int)
    return labels[rows[:, None], cols[None, :]]


def assignment_map(expert_index: torch.Tensor, input_hw: Tuple[int, int],
                   valid_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> np.ndarray:
    """Per-pixel expert id of one image, from the per-token ids of one MoE layer.

    Args:
        expert_index (Tensor): top-1 expert of each token of the image, shape (S,); leading
            tokens outside the patch grid (a cls token) are left out.
        input_hw (tuple[int, int]): size of the network input (padding included).
        valid_hw (tuple[int, int]): the image's part of the input (top-left), before padding.
        out_hw (tuple[int, int]): size of the returned map (the original image's).

    Returns:
        np.ndarray: int map of shape ``out_hw``.
    """
    expert_index = expert_index[prefix_tokens(expert_index.numel(), input_hw):]
    rows, cols, stride = token_grid(expert_index.numel(), input_hw)
    grid = expert_index.reshape(rows, cols).cpu().numpy()
    if stride is not None:  # token (i, j) covers input pixels [i*s, (i+1)*s) x [j*s, (j+1)*s)
        full = np.repeat(np.repeat(grid, stride, 0), stride, 1)[:input_hw[0], :input_hw[1]]
    else:
        full = nearest_resize(grid, input_hw)
    return nearest_resize(full[:valid_hw[0], :valid_hw[1]], out_hw)


@torch.no_grad()
def image_assignments(model: nn.Module, pipeline: Compose, image: str,
                      layers: Dict[str, MoEFeedForward]
                      ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Run one image through the pipeline, data preprocessor and feature extractor.

    Returns:
        (per layer, the per-pixel expert map at the original image size; per layer, the
        tokens per expert, shape (E,))
    """
    if not os.path.isfile(image):
        raise FileNotFoundError(f'image {image!r} does not exist')
    data = pipeline(dict(img_path=image, img_id=0))
    batch = model.data_preprocessor(
        dict(inputs=[data['inputs']], data_samples=[data['data_samples']]), False)
    if not hasattr(model, 'extract_feat'):
        raise ValueError(f'{type(model).__name__} has no extract_feat(); expected an mmseg '
                         'segmentor or an mmdet detector')
    for layer in layers.values():
        layer.last_stats = {}  # so a layer the feature extractor skips cannot show stale ids
    model.extract_feat(batch['inputs'])
    skipped = [name for name, layer in layers.items() if 'expert_index' not in layer.last_stats]
    if skipped:
        raise ValueError(f'layers {skipped} do not run in extract_feat(); choose backbone or '
                         'neck layers')
    meta = batch['data_samples'][0].metainfo
    input_hw = tuple(batch['inputs'].shape[-2:])
    valid_hw = tuple(meta.get('img_shape', input_hw))[:2]
    out_hw = tuple(meta.get('ori_shape', valid_hw))[:2]
    maps, counts = {}, {}
    for name, layer in layers.items():
        index = layer.last_stats['expert_index']
        maps[name] = assignment_map(index, input_hw, valid_hw, out_hw)
        index = index[prefix_tokens(index.numel(), input_hw):]
        counts[name] = np.bincount(index.cpu().numpy(), minlength=layer.num_experts)
    return maps, counts


def expert_colours(num_experts: int) -> np.ndarray:
    """One RGB colour per expert, shape (E, 3) in [0, 1]."""
    import matplotlib
    if num_experts <= 10:
        return np.asarray(matplotlib.colormaps['tab10'].colors[:num_experts])
    if num_experts <= 20:
        return np.asarray(matplotlib.colormaps['tab20'].colors[:num_experts])
    return matplotlib.colormaps['hsv'](np.linspace(0, 1, num_experts, endpoint=False))[:, :3]


def read_rgb(image: str) -> np.ndarray:
    import mmcv
    return mmcv.imread(image, channel_order='rgb')


def short_name(layer: str) -> str:
    return layer[len('backbone.'):] if layer.startswith('backbone.') else layer


def plot_expert_maps(images: Sequence[str], maps: List[Dict[str, np.ndarray]],
                     num_experts: int, path: str, alpha: float = 0.55) -> None:
    """A grid of expert maps over the images (rows: images, columns: the image, then layers).

    Args:
        images (Sequence[str]): image files, one per row.
        maps (list[dict[str, np.ndarray]]): per image, the expert map of each layer.
        num_experts (int): E, for the colours and the legend.
        path (str): PNG file to write.
        alpha (float): opacity of the colours over the image. Default: 0.55.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    colours = expert_colours(num_experts)
    layers = list(maps[0])
    rgbs = [read_rgb(image) / 255.0 for image in images]
    aspect = max(rgb.shape[0] / rgb.shape[1] for rgb in rgbs)
    rows, cols = len(images), len(layers) + 1
    cell, legend = 2.2, 0.4
    height = cell * aspect * rows + 0.3 * rows + legend
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, height), squeeze=False)
    for r, (image, rgb, layer_maps) in enumerate(zip(images, rgbs, maps)):
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_ylabel(os.path.basename(image), fontsize=7)
        for c, layer in enumerate(layers, start=1):
            overlay = (1 - alpha) * rgb + alpha * colours[layer_maps[layer]]
            axes[r, c].imshow(overlay)
            if r == 0:
                axes[r, c].set_title(short_name(layer), fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title('image', fontsize=8)
    handles = [Patch(color=colours[e], label=f'expert {e}') for e in range(num_experts)]
    fig.legend(handles=handles, loc='lower center', ncol=min(num_experts, 8), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, legend / height, 1, 1))
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=80)
    plt.close(fig)


def plot_expert_load(load: Dict[str, np.ndarray], path: str) -> None:
    """One bar chart per layer: share of tokens whose top-1 expert is e, with 1/E dashed.

    Args:
        load (dict[str, np.ndarray]): per layer, tokens per expert, shape (E,).
        path (str): PNG file to write.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    cols = min(len(load), 4)
    rows = math.ceil(len(load) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
    for ax, (layer, counts) in zip(axes.flat, load.items()):
        share = counts / max(counts.sum(), 1)
        num_experts = len(counts)
        ax.bar(range(num_experts), share, color=expert_colours(num_experts))
        ax.axhline(1 / num_experts, color='k', linestyle='--', linewidth=0.8)
        ax.set_title(short_name(layer), fontsize=8)
        ax.set_xticks(range(num_experts))
        ax.set_xlabel('expert', fontsize=8)
        ax.set_ylabel('share of tokens (top-1)', fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(load):]:
        ax.axis('off')
    fig.tight_layout()
    with atomic_write(path, 'wb') as f:
        fig.savefig(f, format='png', dpi=80)
    plt.close(fig)


def visualize_experts(model: nn.Module, cfg: Config, images: Sequence[str],
                      layers: Dict[str, MoEFeedForward], out_dir: str) -> Dict[str, str]:
    """Expert maps and load charts of ``images`` through ``model``, written to ``out_dir``.

    Returns:
        dict: the written files, ``{'maps': path, 'load': path}``.
    """
    pipeline = inference_pipeline(cfg)
    maps, counts = zip(*[image_assignments(model, pipeline, image, layers) for image in images])
    num_experts = max(layer.num_experts for layer in layers.values())
    load = {name: sum(c[name] for c in counts) for name in layers}
    paths = {kind: os.path.join(out_dir, name) for kind, name in OUTPUT_FILES.items()}
    plot_expert_maps(images, list(maps), num_experts, paths['maps'])
    plot_expert_load(load, paths['load'])
    return paths
