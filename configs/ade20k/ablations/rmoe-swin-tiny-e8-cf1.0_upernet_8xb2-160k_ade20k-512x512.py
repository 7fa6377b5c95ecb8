_base_ = ['../rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
# Ablation: capacity factor 1.0 in training (more tokens dropped).
model = dict(backbone=dict(moe_cfg=dict(capacity_factor=1.0)))
