# RMoE-CvT-13 Mask R-CNN 1x on COCO: the dense CvT-13 config with every other block of the
# last two stages an RMoE layer of 8 experts (core: the pretrained MLP).
_base_ = ['./mask-rcnn_cvt-13_fpn_1x_coco.py']
model = dict(
    type='RMoEMaskRCNN',
    backbone=dict(
        type='RMoECvT',
        moe_cfg=dict(num_experts=8, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     router_noise_std=0.125, importance_loss_weight=0.01)))
# Routers get no weight decay, as the cls token and norms already do.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(router=dict(decay_mult=0.))))
