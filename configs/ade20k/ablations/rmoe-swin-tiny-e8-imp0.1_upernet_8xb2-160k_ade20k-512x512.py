_base_ = ['../rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
# Ablation: importance loss weight 0.1 (10x the default).
model = dict(backbone=dict(moe_cfg=dict(importance_loss_weight=0.1)))
