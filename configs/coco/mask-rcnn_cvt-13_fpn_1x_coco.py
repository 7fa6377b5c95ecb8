# Dense CvT-13 Mask R-CNN on COCO: the Swin-T 1x recipe (AdamW, 12 epochs) with the backbone
# swapped.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['rmoe_plugin'], allow_failed_imports=False)

# The official CvT-13 ImageNet-1k weights (CvT-13-224x224-IN-1k.pth) are published only in the
# microsoft/CvT model zoo on OneDrive (https://1drv.ms/u/s!AhIXJn_J-blW9RzF3rMW7SsLHa8h?e=blQ0Al,
# linked from github.com/microsoft/CvT), not at a direct URL: download the file and put it here,
# or pass --cfg-options model.backbone.init_cfg.checkpoint=PATH.
checkpoint_file = 'pretrain/CvT-13-224x224-IN-1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='CvT',
        arch='cvt-13',
        out_indices=(0, 1, 2),
        drop_path_rate=0.1,  # the official CvT-13 recipe: on the last stage
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    # CvT ends at stride 16: P5 and P6 (strides 32 and 64, for the RPN anchors and the largest
    # RoIs) come from stride-2 convs on the FPN outputs rather than from max pooling P4.
    neck=dict(in_channels=[64, 192, 384], num_outs=5, add_extra_convs='on_output'))
# No weight decay on the cls token and on norm layers (the backbone's LayerNorms and the
# BatchNorms of its convolutional projections), as in CvT's ImageNet recipe; the heads' norms
# decay as upstream.
optim_wrapper = dict(paramwise_cfg=dict(
    _delete_=True,
    custom_keys={
        'cls_token': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.),
        'conv_proj_q.bn': dict(decay_mult=0.),
        'conv_proj_k.bn': dict(decay_mult=0.),
        'conv_proj_v.bn': dict(decay_mult=0.)
    }))
