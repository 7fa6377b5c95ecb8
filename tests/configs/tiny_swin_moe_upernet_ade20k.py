# The tiny ADE20K config with the backbone of configs/ade20k/swin-moe-small-* at other sizes
# (tests/test_configs.py checks it is that one): a Swin-MoE of width 16, 4 experts.
_base_ = ['./tiny_rmoe_upernet_ade20k.py']
model = dict(
    backbone=dict(
        pretrain_img_size=64, embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4],
        window_size=4, moe_blocks=None,
        moe_cfg=dict(_delete_=True, num_experts=4, top_k=1, capacity_factor=1.25,
                     eval_capacity_factor=None, batch_prioritized=True, router_type='linear',
                     gate_noise=1.0, straight_through=False, normalize_gates=False,
                     importance_loss_weight=0.01),
        init_cfg=dict(_delete_=True, type='Pretrained', checkpoint='swin_moe_tiny.pth')))
