_base_ = ['mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py']
custom_imports = dict(imports=['rmoe_plugin'], allow_failed_imports=False)

# Every other block of the last two stages becomes an RMoE layer: 8 experts, each the
# pretrained FFN (core) plus a residual learnt on COCO.
model = dict(
    type='RMoEMaskRCNN',
    backbone=dict(
        type='RMoESwinTransformer',
        moe_cfg=dict(num_experts=8, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     router_noise_std=0.125, importance_loss_weight=0.01)))
# Routers get no weight decay, as position tables and norms already do upstream.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(router=dict(decay_mult=0.))))
