# Dense CvT-13 + UperNet on ADE20K: the Swin-T recipe (AdamW, 160k iterations, 512x512 crops)
# with the backbone swapped. CvT has three stages (strides 4, 8, 16), so the heads see three.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
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
    decode_head=dict(in_channels=[64, 192, 384], in_index=[0, 1, 2]),
    auxiliary_head=dict(in_channels=384, in_index=2))
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
