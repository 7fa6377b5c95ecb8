import hashlib
import os
import stat

import pytest
from mmdet.datasets import CocoDataset
from mmengine.registry import init_default_scope
from mmseg.datasets import ADE20KDataset

from rmoe_plugin.datasets import make_ade20k, make_coco


def test_upstream_ade20k_dataset_reads_the_layout(tiny_data):
    init_default_scope('mmseg')
    dataset = ADE20KDataset(
        data_root=tiny_data['ade20k'],
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', reduce_zero_label=True)])
    assert len(dataset) == 8
    sample = dataset[0]
    labels = set(sample['gt_seg_map'].flatten().tolist())
    names = ADE20KDataset.METAINFO['classes']
    assert {names.index('wall'), names.index('sky'), names.index('floor')} <= labels
    assert labels <= set(range(150)) | {255}


def test_upstream_coco_dataset_reads_the_layout(tiny_data):
    init_default_scope('mmdet')
    dataset = CocoDataset(
        data_root=tiny_data['coco'], ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', with_bbox=True, with_mask=True)])
    assert len(dataset) > 0
    sample = dataset[0]
    assert len(sample['gt_bboxes']) == len(sample['gt_masks']) > 0
    names = {CocoDataset.METAINFO['classes'][i] for i in sample['gt_bboxes_labels']}
    assert names <= {'person', 'car', 'dog', 'sports ball'}


def digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            with open(os.path.join(dirpath, f), 'rb') as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_same_seed_same_bytes_and_existing_data_is_kept(tmp_path):
    a = make_coco(str(tmp_path / 'a'), num_train=3, num_val=1, seed=3)
    b = make_coco(str(tmp_path / 'b'), num_train=3, num_val=1, seed=3)
    assert digest(a) == digest(b)
    before = digest(a)
    with pytest.raises(FileExistsError, match='overwrite'):
        make_coco(str(tmp_path / 'a'), num_train=2, num_val=1, seed=4)
    assert digest(a) == before
    ade = make_ade20k(str(tmp_path / 'a'), num_train=2, num_val=1)
    first = digest(ade)
    assert make_ade20k(str(tmp_path / 'a'), num_train=2, num_val=1, seed=5,
                       overwrite=True) == ade
    assert digest(ade) != first  # replaced by the new seed's data
    assert digest(a) == before  # beside it, the COCO data is untouched


def test_a_dataset_folder_gets_the_permissions_mkdir_would_give_it(tmp_path):
    old = os.umask(0o022)
    try:
        os.mkdir(tmp_path / 'plain')
        root = make_ade20k(str(tmp_path / 'data'), num_train=1, num_val=1, size=(32, 32))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(root).st_mode) == stat.S_IMODE(
        os.stat(tmp_path / 'plain').st_mode) == 0o755
