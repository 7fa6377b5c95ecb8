_base_ = ['mmseg::swin/swin-large-patch4-window12-in22k-384x384-pre_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['rmoe_plugin'], allow_failed_imports=False)

# Every other block of the last two stages becomes an RMoE layer: 8 experts, each the
# pretrained FFN (core) plus a residual learnt on ADE20K.
model = dict(
    type='RMoEEncoderDecoder',
    backbone=dict(
        type='RMoESwinTransformer',
        moe_cfg=dict(num_experts=8, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     router_noise_std=0.125, importance_loss_weight=0.01)))
# Routers get no weight decay, as position tables and norms already do upstream.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(router=dict(decay_mult=0.))))
