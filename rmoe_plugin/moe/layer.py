"""The residual-MoE feed-forward layer, in plain PyTorch."""
from functools import partial
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .dispatch import combine, expert_capacity, plan_dispatch
from .expert_exchange import run_experts_parallel
from .experts import ResidualExperts
from .grouped_linear import BACKENDS, choose_backend, grouped_mm_available
from .losses import importance_loss, router_z_loss, switch_balance_loss
from .router import ROUTER_TYPES, Routing, build_router


def check_moe_args(num_experts: int, top_k: int, capacity_factor: Optional[float],
                   eval_capacity_factor: Optional[float], expert_backend: str = 'auto',
                   **loss_weights: float) -> None:
    """Raise ``ValueError`` naming the first argument that cannot make a working layer."""
    if expert_backend not in BACKENDS:
        raise ValueError(f'expert_backend must be one of {BACKENDS}, got {expert_backend!r}')
    if expert_backend == 'grouped_mm' and not grouped_mm_available():
        raise ValueError(f"expert_backend='grouped_mm' needs torch.nn.functional.grouped_mm "
                         f'or torch._grouped_mm, which torch {torch.__version__} lacks')
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f'num_experts must be an int >= 1, got {num_experts!r}')
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f'top_k must be an int in 1..num_experts ({num_experts}), got {top_k!r}')
    for name, value in (('capacity_factor', capacity_factor),
                        ('eval_capacity_factor', eval_capacity_factor)):
        if value is not None and not value > 0:
            raise ValueError(f'{name} must be > 0, or None for dropless routing, got {value!r}')
    for name, value in loss_weights.items():
        if value < 0:
            raise ValueError(f'{name} must be >= 0, got {value!r}')


def check_router_args(router_type: str, router_noise_std: float, gate_noise: float) -> None:
    """Raise ``ValueError`` naming a router argument that cannot make a working router."""
    if router_type not in ROUTER_TYPES:
        raise ValueError(f'router_type must be one of {ROUTER_TYPES}, got {router_type!r}')
    for name, value in (('router_noise_std', router_noise_std), ('gate_noise', gate_noise)):
        if value < 0:
            raise ValueError(f'{name} must be >= 0, got {value!r}')
    if router_noise_std > 0 and gate_noise > 0:
        raise ValueError(f'give router_noise_std ({router_noise_std}) or gate_noise '
                         f'({gate_noise}, std gate_noise / num_experts), not both')


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on, else ``x``'s."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def combine_weight(gates: torch.Tensor, straight_through: bool,
                   normalize: bool) -> torch.Tensor:
    """Per-(token, choice) output weight from the top-k gates, shape (S, k).

    Straight-through: the forward value is ``1/k`` (so top-1 passes the expert output at full
    scale, as the dense FFN did), the gradient is the gate's: ``g + sg(1/k - g)``. Otherwise the
    gates themselves, renormalised over the k choices when ``normalize``.
    """
    top_k = gates.shape[-1]
    if straight_through:
        return gates + (1.0 / top_k - gates).detach()
    if normalize and top_k > 1:
        return gates / gates.sum(dim=-1, keepdim=True)
    return gates


class MoEFeedForward(nn.Module):
    """Router + index dispatch + residual experts + combine, for tokens of shape (..., D).

    The output has the input's shape, and its dtype unless autocast is on (then autocast's,
    as an ``nn.Linear``'s would be); the router and the losses stay fp32. Balance losses
    (training forwards only) and routing statistics of the last forward are kept on the side
    in ``last_losses`` and ``last_stats``; the return value never changes type.

    Args:
        embed_dims (int): token width D.
        feedforward_channels (int): hidden width H of each expert.
        num_experts (int): E. Default: 8.
        top_k (int): experts per token. Default: 1.
        num_fcs (int): projections per expert. Default: 2.
        activation (Callable[[], nn.Module]): builds the hidden activation. Default: nn.GELU.
        dropout (float): dropout inside the experts. Default: 0.
        capacity_factor (float | None): training capacity factor f, slots per expert
            ``k * ceil(f * S / E)``; None is dropless. Default: 1.25.
        eval_capacity_factor (float | None): the same in evaluation. Default: None (dropless).
        batch_prioritized (bool): fill slots in order of each token's top gate over the
            whole group, so the least confident tokens are dropped first. Default: True.
        router_noise_std (float): std of training noise on the router logits. Default: 0.
        straight_through (bool): forward value of the selected expert output unscaled by the gate
            (see :func:`combine_weight`). Default: True.
        normalize_gates (bool): renormalise top-k gates (k > 1, not straight-through).
            Default: True.
        residual_init_std (float): std of the residuals' initial noise. Default: 0.
        freeze_core (bool): train only the residuals. Default: False.
        importance_loss_weight (float): weight of importance CV^2. Default: 0.01.
        balance_loss_weight (float): weight of the Switch load-balancing loss. Default: 0.
        z_loss_weight (float): weight of the router z-loss. Default: 0.
        expert_backend (str): how the experts run: ``'grouped_mm'`` (torch's grouped GEMM,
            no host synchronisation), ``'loop'`` (a matmul per expert, one synchronisation
            per forward) or ``'auto'``: ``'grouped_mm'`` where torch has its fast kernel
            (bf16 on sm90/sm100 GPUs), ``'loop'`` elsewhere. Default: 'auto'.
        router_type (str): ``'linear'`` (no bias) or ``'cosine'`` (Swin-MoE's cosine router,
            see :class:`~.router.CosineTopKRouter`). Default: 'linear'.
        cosine_router_dims (int): projection width of the cosine router. Default: 256.
        cosine_router_init_temperature (float): initial temperature of the cosine router.
            Default: 0.5.
        gate_noise (float): Tutel's router noise: in training the logits get
            ``gate_noise * N(0, 1) / num_experts`` (Swin-MoE: 1.0). Give it or
            ``router_noise_std``, not both. Default: 0.
    """

    def __init__(self, embed_dims: int, feedforward_channels: int, num_experts: int = 8,
                 top_k: int = 1, num_fcs: int = 2,
                 activation: Callable[[], nn.Module] = nn.GELU, dropout: float = 0.0,
                 capacity_factor: Optional[float] = 1.25,
                 eval_capacity_factor: Optional[float] = None,
                 batch_prioritized: bool = True, router_noise_std: float = 0.0,
                 straight_through: bool = True, normalize_gates: bool = True,
                 residual_init_std: float = 0.0, freeze_core: bool = False,
                 importance_loss_weight: float = 0.01, balance_loss_weight: float = 0.0,
                 z_loss_weight: float = 0.0, expert_backend: str = 'auto',
                 router_type: str = 'linear', cosine_router_dims: int = 256,
                 cosine_router_init_temperature: float = 0.5, gate_noise: float = 0.0):
        super().__init__()
        self.loss_weights = dict(importance=importance_loss_weight,
                                 balance=balance_loss_weight, zloss=z_loss_weight)
        check_moe_args(num_experts, top_k, capacity_factor, eval_capacity_factor,
                       expert_backend, importance_loss_weight=importance_loss_weight,
                       balance_loss_weight=balance_loss_weight, z_loss_weight=z_loss_weight)
        if num_fcs < 2:
            raise ValueError(f'num_fcs must be >= 2, got {num_fcs!r}')
        check_router_args(router_type, router_noise_std, gate_noise)
        self.embed_dims = embed_dims
        self.feedforward_channels = feedforward_channels
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.batch_prioritized = batch_prioritized
        self.straight_through = straight_through
        self.normalize_gates = normalize_gates
        self.expert_backend = expert_backend
        widths = [embed_dims] + [feedforward_channels] * (num_fcs - 1) + [embed_dims]
        self.router = build_router(
            router_type, embed_dims, num_experts, top_k,
            noise_std=router_noise_std or gate_noise / num_experts,
            proj_dims=cosine_router_dims, init_temperature=cosine_router_init_temperature)
        self.experts = ResidualExperts(widths, num_experts, activation, dropout,
                                       residual_init_std, freeze_core)
        self.last_losses: Dict[str, torch.Tensor] = {}
        self.last_stats: Dict[str, torch.Tensor] = {}

    def __getstate__(self):
        # The last forward's losses and statistics belong to that forward's graph, not to
        # the layer: a copy (an EMA model, a teacher) starts without them.
        return dict(self.__dict__, last_losses={}, last_stats={})

    def current_capacity_factor(self) -> Optional[float]:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, self.embed_dims)
        num_tokens = tokens.shape[0]
        routing = self.router(tokens)
        capacity = expert_capacity(num_tokens, self.num_experts, self.top_k,
                                   self.current_capacity_factor())
        priority = routing.gates[:, 0] if self.batch_prioritized else None
        plan = plan_dispatch(routing.expert_index, self.num_experts, capacity, priority)

        dtype = compute_dtype(tokens)
        backend = choose_backend(self.expert_backend, tokens.device, dtype)
        if torch.jit.is_tracing():  # tracers see the loop's matmuls (see grouped_linear)
            backend = 'loop'
        parallel = self.experts.parallel
        # The one copy to the host (the expert-parallel exchange makes its own).
        sizes = plan.group_sizes() if backend == 'loop' and parallel is None else None
        expert_in = tokens.to(dtype).index_select(0, plan.token_index)
        with torch.autocast(tokens.device.type, enabled=False):
            if parallel is None:
                expert_out = self.experts(expert_in, plan.group_end, plan.row_expert, sizes,
                                          backend)
            else:
                expert_out = run_experts_parallel(expert_in, plan.tokens_per_expert, parallel,
                                                  partial(self.experts, backend=backend))
        weight = combine_weight(routing.gates, self.straight_through, self.normalize_gates)
        out = combine(expert_out, weight, plan.row, plan.kept)

        self.last_stats = dict(
            expert_load=plan.expert_load,
            tokens_per_expert=plan.tokens_per_expert,
            drop_fraction=plan.num_dropped / (num_tokens * self.top_k),
            importance=routing.probs.detach().sum(0),
            router_entropy=torch.special.entr(routing.probs.detach()).sum(-1).mean(),
            expert_index=routing.expert_index[:, 0].detach())
        self.last_losses = self.balance_losses(routing) if self.training else {}
        return out.view(*x.shape[:-1], self.embed_dims)

    def balance_losses(self, routing: Routing) -> Dict[str, torch.Tensor]:
        """Weighted balance losses with a non-zero weight, keyed ``loss_moe_<name>``."""
        terms = dict(importance=lambda: importance_loss(routing.probs),
                     balance=lambda: switch_balance_loss(routing.probs, routing.expert_index),
                     zloss=lambda: router_z_loss(routing.logits))
        return {f'loss_moe_{name}': weight * terms[name]()
                for name, weight in self.loss_weights.items() if weight > 0}
