# The same classification stage with the RMoE backbone: the MoE upper bound trains it from
# scratch; RMoE-I's short intermediate stage starts it from the dense upstream checkpoint.
_base_ = ['./swin-mini_dense_cls-imagenet-64x64.py']
model = dict(
    type='RMoEImageClassifier',
    backbone=dict(type='mmseg.RMoESwinTransformer',
                  moe_cfg=dict(num_experts=4, top_k=1, capacity_factor=1.25,
                               router_noise_std=0.25, importance_loss_weight=0.01)))
