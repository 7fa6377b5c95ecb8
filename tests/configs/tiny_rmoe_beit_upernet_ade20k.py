# The RMoE-BEiT-L UperNet ADE20K config, shrunk to run a few iterations on the CPU in a test:
# a 4-layer BEiT of width 16 (MoE in layers 1 and 3), 64x64 crops, no AMP (CPU), and a plain
# learning rate instead of the 3000-iteration warm-up.
_base_ = ['../../configs/ade20k/rmoe-beit-large-e8_upernet_8xb1-amp-160k_ade20k-640x640.py']
crop_size = (64, 64)
data_root = 'data/ade/ADEChallengeData2016'
model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(img_size=crop_size, patch_size=8, embed_dims=16, num_layers=4, num_heads=2,
                  mlp_ratio=2, init_values=0.1, drop_path_rate=0.0, out_indices=[0, 1, 2, 3],
                  moe_cfg=dict(num_experts=4)),
    neck=dict(embed_dim=16),
    decode_head=dict(in_channels=[16, 16, 16, 16], channels=16, pool_scales=(1, 2)),
    auxiliary_head=dict(in_channels=16, channels=8),
    test_cfg=dict(mode='whole'))
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
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=1e-3),
                     paramwise_cfg=dict(num_layers=4), accumulative_counts=1)
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=4)]
train_cfg = dict(max_iters=4, val_interval=4)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
custom_hooks = [dict(type='MoEStatsHook', interval=1)]
