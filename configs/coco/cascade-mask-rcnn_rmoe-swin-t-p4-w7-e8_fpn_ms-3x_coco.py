_base_ = ['mmdet::cascade_rcnn/cascade-mask-rcnn_r50_fpn_ms-3x_coco.py']
custom_imports = dict(imports=['rmoe_plugin'], allow_failed_imports=False)
# Upstream ships no Swin Cascade Mask R-CNN config: its ResNet-50 one with the Swin-T backbone,
# neck widths and AdamW of mmdet's Swin Mask R-CNN configs.
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth'  # noqa
model = dict(
    type='RMoECascadeRCNN',
    backbone=dict(
        _delete_=True,
        type='RMoESwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.2,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        convert_weights=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained),
        moe_cfg=dict(num_experts=8, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     router_noise_std=0.125, importance_loss_weight=0.01)),
    neck=dict(in_channels=[96, 192, 384, 768]))
optim_wrapper = dict(
    type='OptimWrapper',
    paramwise_cfg=dict(
        custom_keys={
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
            'router': dict(decay_mult=0.)
        }),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999),
                   weight_decay=0.05))
