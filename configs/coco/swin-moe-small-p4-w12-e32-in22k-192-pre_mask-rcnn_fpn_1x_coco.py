_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['rmoe_plugin'], allow_failed_imports=False)

# Swin-MoE-S (microsoft/Swin-Transformer, trained with Tutel on ImageNet-22K at 192x192):
# 32 experts, linear router; the backbone is the ADE20K config's (tests/test_configs.py checks
# they agree). The released checkpoint loads as it is unzipped, or converted by
# tools/convert_swin_moe.py (see configs/ade20k/README.md).
checkpoint = 'pretrain/swin_moe_small_patch4_window12_192_32expert_32gpu_22k/swin_moe_small_patch4_window12_192_32expert_32gpu_22k.pth'  # noqa
model = dict(
    type='RMoEMaskRCNN',
    backbone=dict(
        type='RMoESwinTransformer',
        pretrain_img_size=192,
        embed_dims=96,
        depths=[2, 2, 18, 2],
        num_heads=[3, 6, 12, 24],
        window_size=12,
        moe_blocks=None,  # the odd blocks of the last two stages: Swin-MoE's choice
        moe_cfg=dict(num_experts=32, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     batch_prioritized=True, router_type='linear', gate_noise=1.0,
                     straight_through=False, normalize_gates=False,
                     importance_loss_weight=0.01),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
# Routers get no weight decay, as position tables and norms already do upstream.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(router=dict(decay_mult=0.))))
