# The steady tiny config with what users add to long runs: an EMA of the weights (validated
# and saved beside them) and gradient clipping by norm.
_base_ = ['./tiny_rmoe_upernet_ade20k_steady.py']
custom_hooks = [dict(type='EMAHook', momentum=0.5, priority='ABOVE_NORMAL')]
optim_wrapper = dict(clip_grad=dict(max_norm=1.0))
