# The dense CvT-13 UperNet ADE20K config, shrunk to run a few iterations on the CPU in a test.
_base_ = ['../../configs/ade20k/cvt-13_upernet_8xb2-160k_ade20k-512x512.py']
crop_size = (64, 64)
data_root = 'data/ade/ADEChallengeData2016'
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        arch=dict(
            _delete_=True, dim_embed=[16, 32, 48], depth=[1, 1, 2], num_heads=[1, 2, 3],
            patch_size=[7, 3, 3], patch_stride=[4, 2, 2], patch_padding=[2, 1, 1],
            mlp_ratio=4.0, qkv_bias=True, cls_token=[False, False, True], kernel_qkv=3,
            padding_q=1, padding_kv=1, stride_q=1, stride_kv=2),
        init_cfg=None),
    decode_head=dict(in_channels=[16, 32, 48], channels=16, pool_scales=(1, 2)),
    auxiliary_head=dict(in_channels=48, channels=8))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(128, 64), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=4, val_interval=4)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
