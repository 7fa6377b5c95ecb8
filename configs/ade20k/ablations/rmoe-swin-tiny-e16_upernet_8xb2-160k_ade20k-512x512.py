_base_ = ['../rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
# Ablation: 16 experts (the paper saw no clear gain beyond).
model = dict(backbone=dict(moe_cfg=dict(num_experts=16, router_noise_std=0.0625)))
