_base_ = ['../rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
# Ablation: top-2 routing (straight-through: each chosen expert counts 1/2).
model = dict(backbone=dict(moe_cfg=dict(top_k=2)))
