# Upstream (classification) stage of the miniature pipelines: a 4-stage Swin of width 32 on
# ImageNet-layout data at 64x64, trained through mmpretrain's ImageClassifier. The backbone is
# mmseg's Swin so the checkpoint loads into the downstream configs as it is.
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['rmoe_plugin'], allow_failed_imports=False)
data_root = 'data/imagenet'
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='mmseg.SwinTransformer', embed_dims=32, depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8], window_size=4, pretrain_img_size=64, drop_path_rate=0.1,
        out_indices=(3, )),
    neck=dict(type='ListGlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=5, in_channels=256,
              loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))
data_preprocessor = dict(num_classes=5, mean=[123.675, 116.28, 103.53],
                         std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=64, crop_ratio_range=(0.5, 1.0)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=16, num_workers=0,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline),
    sampler=dict(type='InfiniteSampler', shuffle=True))
val_dataloader = dict(
    batch_size=32, num_workers=0,
    dataset=dict(type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={
        'relative_position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        'router': dict(decay_mult=0.)}))
max_iters = 400
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=20, end=max_iters, eta_min=1e-5)]
train_cfg = dict(by_epoch=False, max_iters=max_iters, val_interval=max_iters)
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters,
                    max_keep_ckpts=1))
custom_hooks = [dict(type='CostHook')]
randomness = dict(seed=0)
