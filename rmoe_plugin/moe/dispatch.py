"""Index-based dispatch: order (token, choice) pairs by expert, enforce capacity, combine back.

No dense S x E x C one-hot is built. One stable sort puts every kept assignment next to the
others of its expert, so the experts run as a grouped matmul over contiguous slices.
"""
import math
from typing import NamedTuple, Optional

import torch


class DispatchPlan(NamedTuple):
    """Where each kept (token, choice) assignment goes.

    Attributes:
        token_index (Tensor): token of each kept assignment, grouped by expert, shape (N,).
        choice_index (Tensor): flat index ``token * k + choice`` of each kept assignment into
            the router's (S, k) outputs, shape (N,).
        tokens_per_expert (Tensor): kept assignments per expert, shape (E,), sums to N.
        expert_load (Tensor): assignments per expert before the capacity cut, shape (E,).
        row (Tensor): each assignment's row among the kept ones (the order of
            ``token_index``), -1 if dropped, shape (S, k).
        order (Tensor): flat (token, choice) indices sorted by expert, then service order.
        sorted_position (Tensor): the slot of each assignment in ``order``.
    """
    token_index: torch.Tensor
    choice_index: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_load: torch.Tensor
    row: torch.Tensor
    order: torch.Tensor
    sorted_position: torch.Tensor

    @property
    def num_dropped(self) -> torch.Tensor:
        return self.expert_load.sum() - self.tokens_per_expert.sum()

    @property
    def position(self) -> torch.Tensor:
        """Each assignment's slot in its expert's buffer, shape (S, k); a slot >= capacity
        means it was dropped. Formed on demand: the forward itself needs only ``row``."""
        position = torch.empty_like(self.sorted_position)
        position[self.order] = self.sorted_position
        return position.view(self.row.shape)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: Optional[float]) -> Optional[int]:
    """Slots per expert, ``k * ceil(f * S / E)``; ``None`` (dropless) when ``f`` is None."""
    if capacity_factor is None:
        return None
    return top_k * math.ceil(capacity_factor * num_tokens / num_experts)


def priority_rank(priority: torch.Tensor) -> torch.Tensor:
    """Rank of each token when sorted by descending ``priority`` (0 = served first)."""
    order = torch.argsort(priority, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def plan_dispatch(expert_index: torch.Tensor, num_experts: int,
                  capacity: Optional[int] = None,
                  priority: Optional[torch.Tensor] = None) -> DispatchPlan:
    """Give each (token, choice) a slot in its expert's buffer and keep those within capacity.

    Slots are filled choice by choice (all first choices before any second choice, as GShard
    and Tutel do); within a choice, tokens are served in order of ``priority`` (batch-prioritised
    routing) or, without it, in token order.

    Args:
        expert_index (Tensor): experts chosen per token, shape (S, k).
        num_experts (int): E.
        capacity (int, optional): slots per expert; None keeps every assignment (dropless).
        priority (Tensor, optional): per-token priority, shape (S,); higher is served first.

    Returns:
        DispatchPlan
    """
    num_tokens, top_k = expert_index.shape
    device = expert_index.device
    rank = (priority_rank(priority) if priority is not None
            else torch.arange(num_tokens, device=device))
    choice_offset = torch.arange(top_k, device=device) * num_tokens
    # Unique key per assignment: expert first, then choice, then service order.
    key = expert_index * (top_k * num_tokens) + choice_offset + rank[:, None]
    order = torch.argsort(key.flatten())
    sorted_expert = expert_index.flatten()[order]

    expert_load = torch.bincount(expert_index.flatten(), minlength=num_experts)
    group_start = torch.cumsum(expert_load, 0) - expert_load
    sorted_position = torch.arange(order.numel(), device=device) - group_start[sorted_expert]

    row = torch.empty_like(sorted_position)
    if capacity is None:
        kept_order, tokens_per_expert = order, expert_load
        row[order] = torch.arange(order.numel(), device=device)
    else:
        kept = sorted_position < capacity
        kept_order = order[kept]
        tokens_per_expert = expert_load.clamp(max=capacity)
        row[order] = torch.where(kept, torch.cumsum(kept, 0) - 1, -1)
    return DispatchPlan(
        token_index=torch.div(kept_order, top_k, rounding_mode='floor'),
        choice_index=kept_order,
        tokens_per_expert=tokens_per_expert,
        expert_load=expert_load,
        row=row.view(num_tokens, top_k),
        order=order,
        sorted_position=sorted_position)


def combine(expert_output: torch.Tensor, weight: torch.Tensor,
            row: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum of its kept expert outputs; dropped assignments add zero.

    A gather (backward: index_add) rather than a scatter into a zero-filled output.

    Args:
        expert_output (Tensor): outputs of the kept assignments in expert order, shape (N, D).
        weight (Tensor): combine weight per (token, choice), shape (S, k).
        row (Tensor): row of ``expert_output`` per (token, choice), -1 if dropped, shape (S, k).

    Returns:
        Tensor: shape (S, D).
    """
    num_tokens, top_k = row.shape
    weight = (weight * (row >= 0)).to(expert_output.dtype)
    gathered = expert_output.index_select(0, row.clamp(min=0).flatten())
    if top_k == 1:
        return gathered * weight
    gathered = gathered.view(num_tokens, top_k, expert_output.shape[-1])
    return torch.bmm(weight[:, None, :], gathered)[:, 0]
