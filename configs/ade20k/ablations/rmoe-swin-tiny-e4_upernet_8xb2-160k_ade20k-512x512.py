_base_ = ['../rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
# Ablation: 4 experts.
model = dict(backbone=dict(moe_cfg=dict(num_experts=4, router_noise_std=0.25)))
