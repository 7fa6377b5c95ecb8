"""Pure-PyTorch mixture-of-experts parts; nothing here imports OpenMMLab."""
from .collect import collect_moe_losses
from .dispatch import DispatchPlan, combine, expert_capacity, plan_dispatch, priority_rank
from .expert_exchange import ExpertParallelGroups, expert_parallel_groups
from .expert_parallel import (clip_grad_norm_, enable_expert_parallel, gathered_experts,
                              shard_optimizer_state)
from .experts import ResidualExperts
from .layer import MoEFeedForward, check_moe_args, combine_weight
from .losses import cv_squared, importance_loss, router_z_loss, switch_balance_loss
from .router import CosineTopKRouter, Router, Routing, TopKRouter

__all__ = [
    'CosineTopKRouter', 'DispatchPlan', 'ExpertParallelGroups', 'MoEFeedForward',
    'ResidualExperts', 'Router', 'Routing', 'TopKRouter', 'check_moe_args', 'clip_grad_norm_',
    'collect_moe_losses', 'combine', 'combine_weight', 'cv_squared', 'enable_expert_parallel',
    'expert_capacity', 'expert_parallel_groups', 'gathered_experts', 'importance_loss',
    'plan_dispatch', 'priority_rank', 'router_z_loss', 'shard_optimizer_state',
    'switch_balance_loss'
]
