_base_ = ['../rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
# Ablation: MoE in stage 3 only (blocks 1, 3, 5).
model = dict(backbone=dict(moe_blocks=[[], [], [1, 3, 5], []]))
