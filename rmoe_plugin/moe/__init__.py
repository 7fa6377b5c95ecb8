"""Pure-PyTorch mixture-of-experts parts; nothing here imports OpenMMLab."""
from .collect import collect_moe_losses
from .dispatch import DispatchPlan, combine, expert_capacity, plan_dispatch, priority_rank
from .experts import ResidualExperts
from .layer import MoEFeedForward, check_moe_args, combine_weight
from .losses import cv_squared, importance_loss, router_z_loss, switch_balance_loss
from .router import CosineTopKRouter, Router, Routing, TopKRouter

__all__ = [
    'CosineTopKRouter', 'DispatchPlan', 'MoEFeedForward', 'ResidualExperts', 'Router',
    'Routing', 'TopKRouter', 'check_moe_args', 'collect_moe_losses', 'combine',
    'combine_weight', 'cv_squared', 'expert_capacity', 'importance_loss', 'plan_dispatch',
    'priority_rank', 'router_z_loss', 'switch_balance_loss'
]
