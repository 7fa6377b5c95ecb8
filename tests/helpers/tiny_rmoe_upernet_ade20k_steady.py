# The tiny ADE20K config made reproducible for the multi-process tests: fixed seed, no router
# noise, no drop path or dropout (so nothing but the seeded data pipeline draws random
# numbers), a short warm-up so that a few steps move the weights, checkpoints every 2
# iterations, and the test hooks of rmoe_dist_helpers (tests/helpers on PYTHONPATH).
_base_ = ['../configs/tiny_rmoe_upernet_ade20k.py']
custom_imports = dict(imports=['rmoe_plugin', 'rmoe_dist_helpers'], allow_failed_imports=False)
randomness = dict(seed=0)
model = dict(
    backbone=dict(drop_path_rate=0., moe_cfg=dict(router_noise_std=0.)),
    decode_head=dict(dropout_ratio=0.),
    auxiliary_head=dict(dropout_ratio=0.))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=3),
    dict(type='PolyLR', eta_min=0., power=1.0, begin=3, end=100, by_epoch=False)
]
train_cfg = dict(max_iters=4, val_interval=4)
default_hooks = dict(checkpoint=dict(interval=2), replicas=dict(type='ReplicaChecksumHook'))
