# The downstream stage with the RMoE backbone (RMoE-I, RMoE-D and the MoE upper bound).
_base_ = ['./swin-mini_dense_upernet_seg-ade20k-64x64.py']
model = dict(
    type='RMoEEncoderDecoder',
    backbone=dict(type='RMoESwinTransformer',
                  moe_cfg=dict(num_experts=4, top_k=1, capacity_factor=1.25,
                               router_noise_std=0.25, importance_loss_weight=0.01)))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(router=dict(decay_mult=0.))))
