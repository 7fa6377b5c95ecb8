_base_ = ['mmseg::swin/swin-small-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['rmoe_plugin'], allow_failed_imports=False)

# Swin-MoE-S (microsoft/Swin-Transformer, trained with Tutel on ImageNet-22K at 192x192):
# 32 experts, linear router. The released checkpoint loads as it is unzipped (NAME.pth with its
# .master and .rank* files beside it), or converted by tools/convert_swin_moe.py (README.md).
# The COCO config has this backbone too (tests/test_configs.py checks they agree).
checkpoint = 'pretrain/swin_moe_small_patch4_window12_192_32expert_32gpu_22k/swin_moe_small_patch4_window12_192_32expert_32gpu_22k.pth'  # noqa
model = dict(
    type='RMoEEncoderDecoder',
    backbone=dict(
        type='RMoESwinTransformer',
        pretrain_img_size=192,
        embed_dims=96,
        depths=[2, 2, 18, 2],
        num_heads=[3, 6, 12, 24],
        window_size=12,
        # None: every other block (the odd ones) of the last two stages, whatever the depths:
        # Swin-MoE's MOE_BLOCKS [[-1], [-1], [1, 3, ..., 17], [1]] for these.
        moe_blocks=None,
        # Swin-MoE's routing: top-1, capacity 1.25, batch-prioritised, Tutel's noise (std 1/E),
        # output gate * expert(x); its experts load as core (their mean) + residuals.
        moe_cfg=dict(num_experts=32, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     batch_prioritized=True, router_type='linear', gate_noise=1.0,
                     straight_through=False, normalize_gates=False,
                     importance_loss_weight=0.01),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
# Routers get no weight decay, as position tables and norms already do upstream.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(router=dict(decay_mult=0.))))
