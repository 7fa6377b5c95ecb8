# RMoE-CvT-13 + UperNet on ADE20K: the dense CvT-13 config with every other block of the last
# two stages (stage1.blocks.1, stage2.blocks.{1,3,5,7,9}) an RMoE layer of 8 experts, each the
# pretrained MLP (core) plus a residual learnt on ADE20K.
_base_ = ['./cvt-13_upernet_8xb2-160k_ade20k-512x512.py']
model = dict(
    type='RMoEEncoderDecoder',
    backbone=dict(
        type='RMoECvT',
        moe_cfg=dict(num_experts=8, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     router_noise_std=0.125, importance_loss_weight=0.01)))
# Routers get no weight decay, as the cls token and norms already do.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(router=dict(decay_mult=0.))))
