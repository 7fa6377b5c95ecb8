_base_ = ['./mask-rcnn_rmoe-swin-t-p4-w7-e8_fpn_1x_coco.py']
# Swin-S: as upstream's Swin-S configs do over Swin-T.
pretrained = 'https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_small_patch4_window7_224.pth'  # noqa
model = dict(
    backbone=dict(depths=[2, 2, 18, 2], init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
