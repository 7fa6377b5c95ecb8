# The tiny dense CvT Mask R-CNN config with what configs/coco/mask-rcnn_rmoe-cvt-13-e8_... adds
# to its dense config (tests/test_configs.py checks they agree), 4 experts in two blocks.
_base_ = ['./tiny_cvt_mask-rcnn_coco.py']
model = dict(
    type='RMoEMaskRCNN',
    backbone=dict(
        type='RMoECvT',
        moe_blocks=[[], [0], [1]],  # the tiny CvT has 1, 1 and 2 blocks
        moe_cfg=dict(num_experts=4, top_k=1, capacity_factor=1.25, eval_capacity_factor=None,
                     router_noise_std=0.125, importance_loss_weight=0.01)))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=dict(router=dict(decay_mult=0.))))
