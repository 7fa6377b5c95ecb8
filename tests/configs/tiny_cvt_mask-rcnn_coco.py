# The dense CvT-13 Mask R-CNN COCO config, shrunk to run a few iterations on the CPU in a test.
_base_ = ['../../configs/coco/mask-rcnn_cvt-13_fpn_1x_coco.py']
data_root = 'data/coco/'
model = dict(
    backbone=dict(
        arch=dict(
            _delete_=True, dim_embed=[16, 32, 48], depth=[1, 1, 2], num_heads=[1, 2, 3],
            patch_size=[7, 3, 3], patch_stride=[4, 2, 2], patch_padding=[2, 1, 1],
            mlp_ratio=4.0, qkv_bias=True, cls_token=[False, False, True], kernel_qkv=3,
            padding_q=1, padding_kv=1, stride_q=1, stride_kv=2),
        init_cfg=None),
    neck=dict(in_channels=[16, 32, 48], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=16),
        bbox_head=dict(in_channels=16, fc_out_channels=32),
        mask_roi_extractor=dict(out_channels=16),
        mask_head=dict(in_channels=16, conv_out_channels=16)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=1)
default_hooks = dict(logger=dict(interval=1))
