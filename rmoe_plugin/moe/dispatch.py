"""Index-based dispatch: order (token, choice) pairs by expert, enforce capacity, combine back.

No dense S x E x C one-hot is built. One sort puts every kept assignment next to the others
of its expert, so the experts run as a grouped matmul over contiguous slices. Nothing here
reads a tensor's values on the host: the plan's sizes depend on S and k only.
"""
import math
from typing import NamedTuple, Optional

import torch


class DispatchPlan(NamedTuple):
    """Where each (token, choice) assignment goes.

    Every one of the S * k assignments gets a row of the experts' input: the kept ones first,
    grouped by expert, then the dropped ones, which no expert computes. All sizes are fixed
    by S and k, so planning never waits for the host.

    Attributes:
        token_index (Tensor): token of each row, shape (S * k,).
        choice_index (Tensor): flat index ``token * k + choice`` of each row's assignment
            into the router's (S, k) outputs, shape (S * k,).
        tokens_per_expert (Tensor): kept assignments per expert, shape (E,).
        expert_load (Tensor): assignments per expert before the capacity cut, shape (E,).
        group_end (Tensor): int32 ``cumsum(tokens_per_expert)``: where each expert's rows
            end, shape (E,).
        row_expert (Tensor): expert of each row, E for a dropped one, shape (S * k,).
        row (Tensor): each assignment's row, shape (S, k).
        kept (Tensor): whether each assignment is within capacity, shape (S, k).
        num_dropped (Tensor): assignments over capacity, a 0-d tensor.
        order (Tensor): flat (token, choice) indices sorted by expert, then service order.
        sorted_position (Tensor): the slot of each assignment in ``order``.
    """
    token_index: torch.Tensor
    choice_index: torch.Tensor
    tokens_per_expert: torch.Tensor
    expert_load: torch.Tensor
    group_end: torch.Tensor
    row_expert: torch.Tensor
    row: torch.Tensor
    kept: torch.Tensor
    num_dropped: torch.Tensor
    order: torch.Tensor
    sorted_position: torch.Tensor

    @property
    def position(self) -> torch.Tensor:
        """Each assignment's slot in its expert's buffer, shape (S, k); a slot >= capacity
        means it was dropped. Formed on demand: the forward itself needs only ``row``."""
        position = torch.empty_like(self.sorted_position)
        position[self.order] = self.sorted_position
        return position.view(self.row.shape)

    def group_sizes(self) -> torch.Tensor:
        """Rows per expert, then the dropped rows, shape (E + 1,), copied to the host (on a
        GPU, the one point where the host waits for the device)."""
        return torch.cat([self.tokens_per_expert, self.num_dropped[None]]).cpu()


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


def histogram(index: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Counts of each value in ``0..num_bins-1`` (``bincount`` would wait for the host on a
    GPU, to size its output)."""
    counts = torch.zeros(num_bins, dtype=torch.long, device=index.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))


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
    num_rows = num_tokens * top_k
    device = expert_index.device
    rank = (priority_rank(priority) if priority is not None
            else torch.arange(num_tokens, device=device))
    choice_offset = torch.arange(top_k, device=device) * num_tokens
    # Unique key per assignment: expert first, then choice, then service order.
    key = expert_index * num_rows + choice_offset + rank[:, None]
    order = torch.argsort(key.flatten())
    sorted_expert = expert_index.flatten()[order]

    expert_load = histogram(expert_index.flatten(), num_experts)
    group_start = torch.cumsum(expert_load, 0) - expert_load
    sorted_position = torch.arange(num_rows, device=device) - group_start[sorted_expert]
    if capacity is None:
        tokens_per_expert, sorted_row = expert_load, torch.arange(num_rows, device=device)
        sorted_row_expert = sorted_expert
    else:
        tokens_per_expert = expert_load.clamp(max=capacity)
        kept_start = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        sorted_kept = sorted_position < capacity
        dropped_row = tokens_per_expert.sum() + torch.cumsum(~sorted_kept, 0) - 1
        sorted_row = torch.where(sorted_kept, kept_start[sorted_expert] + sorted_position,
                                 dropped_row)
        sorted_row_expert = torch.where(sorted_kept, sorted_expert, num_experts)

    row = torch.empty_like(order)
    row[order] = sorted_row
    choice_index = torch.empty_like(order)
    choice_index[sorted_row] = order
    row_expert = torch.empty_like(order)
    row_expert[sorted_row] = sorted_row_expert
    group_end = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
    return DispatchPlan(
        token_index=torch.div(choice_index, top_k, rounding_mode='floor'),
        choice_index=choice_index,
        tokens_per_expert=tokens_per_expert,
        expert_load=expert_load,
        group_end=group_end,
        row_expert=row_expert,
        row=row.view(num_tokens, top_k),
        kept=(row < group_end[-1]).view(num_tokens, top_k),
        num_dropped=num_rows - group_end[-1].long(),
        order=order,
        sorted_position=sorted_position)


def combine(expert_output: torch.Tensor, weight: torch.Tensor, row: torch.Tensor,
            kept: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum of its kept expert outputs; dropped assignments add zero.

    A dropped assignment's row holds no expert's output (anything, NaN included): it is
    selected away, never multiplied by zero, and gets no gradient. A gather (backward:
    index_add) rather than a scatter into a zero-filled output.

    Args:
        expert_output (Tensor): one row per assignment, kept ones in expert order, (S * k, D).
        weight (Tensor): combine weight per (token, choice), shape (S, k).
        row (Tensor): row of ``expert_output`` per (token, choice), shape (S, k).
        kept (Tensor): whether each (token, choice) was kept, shape (S, k).

    Returns:
        Tensor: shape (S, D).
    """
    num_tokens, top_k = row.shape
    gathered = expert_output.index_select(0, row.flatten())
    gathered = torch.where(kept.reshape(-1, 1), gathered, 0)
    weight = weight.to(expert_output.dtype)
    if top_k == 1:
        return gathered * weight
    gathered = gathered.view(num_tokens, top_k, expert_output.shape[-1])
    return torch.bmm(weight[:, None, :], gathered)[:, 0]
