_base_ = ['../rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
# Ablation: Switch load-balancing loss instead of importance CV^2.
model = dict(backbone=dict(moe_cfg=dict(importance_loss_weight=0.0, balance_loss_weight=0.01)))
