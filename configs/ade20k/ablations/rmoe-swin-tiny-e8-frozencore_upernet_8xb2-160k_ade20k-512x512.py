_base_ = ['../rmoe-swin-tiny-patch4-window7-e8-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
# Ablation: frozen core, only residuals and routers learn in the MoE layers.
model = dict(backbone=dict(moe_cfg=dict(freeze_core=True)))
