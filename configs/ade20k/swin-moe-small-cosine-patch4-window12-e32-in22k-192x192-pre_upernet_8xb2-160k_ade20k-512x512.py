_base_ = ['./swin-moe-small-patch4-window12-e32-in22k-192x192-pre_upernet_8xb2-160k_ade20k-512x512.py']  # noqa
# Swin-MoE-S with 32 experts and the cosine router (projection to 256, learnt temperature).
checkpoint = 'pretrain/swin_moe_small_patch4_window12_192_cosine_router_32expert_32gpu_22k/swin_moe_small_patch4_window12_192_cosine_router_32expert_32gpu_22k.pth'  # noqa
model = dict(
    backbone=dict(
        moe_cfg=dict(router_type='cosine', cosine_router_dims=256,
                     cosine_router_init_temperature=0.5),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)))
