_base_ = ['../swin-moe-small-patch4-window12-e32-in22k-192x192-pre_upernet_8xb2-160k_ade20k-512x512.py']  # noqa
# RMoE's view of Swin-MoE: the core (the mean of the pre-trained experts) stays as it is, only
# the residuals (each expert minus that mean) and the routers learn.
model = dict(backbone=dict(moe_cfg=dict(freeze_core=True)))
