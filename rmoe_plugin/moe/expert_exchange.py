"""Expert parallelism's process groups and token exchange.

The E experts of a layer are split over the P ranks of an expert-parallel group, E/P
consecutive experts a rank: rank p holds experts ``p*E/P ... (p+1)*E/P - 1``. Every rank
routes its own tokens and plans their dispatch as it would alone (capacity per source rank, so
the same assignments are dropped as under data parallelism); the kept rows, already grouped by
expert, travel to their experts' ranks in one all-to-all, are regrouped by local expert,
computed, put back in arrival order and return with the reverse all-to-all. Autograd
differentiates both exchanges. With a world of W ranks, the W/P expert-parallel groups are
consecutive ranks, and the ranks that hold the same experts (one per group) form a replicate
group over which those experts' gradients are reduced.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


@dataclass(frozen=True, eq=False)
class ExpertParallelGroups:
    """Where a rank stands in expert parallelism.

    Attributes:
        expert_group (ProcessGroup): the P ranks that share out the experts.
        expert_ranks (tuple[int]): their global ranks, in expert order.
        replicate_group (ProcessGroup | None): the ranks that hold the same experts as this
            one, one in each expert-parallel group; None when there is one group (P = W).
        world_size (int): W, the ranks whose gradients data parallelism averages.
    """
    expert_group: dist.ProcessGroup
    expert_ranks: Tuple[int, ...]
    replicate_group: Optional[dist.ProcessGroup]
    world_size: int

    @property
    def size(self) -> int:
        return len(self.expert_ranks)

    @property
    def rank(self) -> int:
        """This rank's place in the expert-parallel group: it holds expert block ``rank``."""
        return self.expert_ranks.index(dist.get_rank())

    @classmethod
    def from_mesh(cls, mesh, expert_dim: str = 'expert') -> 'ExpertParallelGroups':
        """The groups of a ``DeviceMesh``: its ``expert_dim`` shares out the experts; on a
        2-D mesh the other dimension holds the replicas, a 1-D mesh must span the world.

        Raises:
            ValueError: the mesh has more than 2 dimensions, or is 1-D and not the world.
        """
        world_size = dist.get_world_size()
        expert_group = mesh.get_group(expert_dim)
        others = [name for name in mesh.mesh_dim_names if name != expert_dim]
        if len(others) > 1 or (not others and mesh.size() != world_size):
            raise ValueError(f'expert parallelism takes a 1-D mesh over all {world_size} ranks '
                             f'or a 2-D (replicate, expert) mesh, got {mesh}')
        replicate_group = mesh.get_group(others[0]) if others else None
        ranks = tuple(dist.get_process_group_ranks(expert_group))
        return cls(expert_group, ranks, replicate_group, world_size)

    def local_experts(self, num_experts: int) -> range:
        """The global indices of the experts this rank holds."""
        per_rank = num_experts // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def __deepcopy__(self, memo):
        # A copy of a model (an EMA model, a teacher) exchanges over the same groups.
        return self

    def __reduce__(self):
        raise TypeError('an expert-parallel model cannot be pickled (its process groups live '
                        'in this process only); save its state_dict, which holds every expert')


_GROUPS: Dict[Tuple[int, int], ExpertParallelGroups] = {}


def expert_parallel_groups(expert_parallel_size: int) -> ExpertParallelGroups:
    """This rank's groups for P-way expert parallelism over the default process group.

    Every rank must call it (with the same P): creating process groups is collective. The
    groups are made once per P and default group.

    Raises:
        RuntimeError: no default process group.
        ValueError: P is not a positive divisor of the world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError('expert parallelism needs torch.distributed initialised '
                           '(torch.distributed.init_process_group)')
    world_size = dist.get_world_size()
    if (not isinstance(expert_parallel_size, int) or expert_parallel_size < 1
            or world_size % expert_parallel_size):
        raise ValueError(f'expert_parallel_size must divide the world size ({world_size} '
                         f'processes), got {expert_parallel_size!r}')
    key = (id(dist.group.WORLD), expert_parallel_size)
    if key not in _GROUPS:
        _GROUPS[key] = _new_groups(expert_parallel_size, world_size)
    return _GROUPS[key]


def _new_groups(size: int, world_size: int) -> ExpertParallelGroups:
    rank, mine, replicas = dist.get_rank(), None, None
    # new_group is collective over the whole world: every rank creates every group.
    for start in range(0, world_size, size):
        ranks = list(range(start, start + size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, tuple(ranks))
    if world_size > size:
        for offset in range(size):
            ranks = list(range(offset, world_size, size))
            group = dist.new_group(ranks)
            if rank in ranks:
                replicas = group
    return ExpertParallelGroups(mine[0], mine[1], replicas, world_size)


def exchanged_counts(tokens_per_expert: Tensor, groups: ExpertParallelGroups) -> Tensor:
    """How many rows each rank of the group sends to each of this rank's experts, (P, E/P)."""
    received = torch.empty_like(tokens_per_expert)
    dist.all_to_all_single(received, tokens_per_expert, group=groups.expert_group)
    return received.view(groups.size, -1)


def all_to_all(rows: Tensor, output_splits: List[int], input_splits: List[int],
               groups: ExpertParallelGroups) -> Tensor:
    """Rows to and from every rank of the group, differentiable (the backward runs the
    reverse exchange). Transported in fp32 where the backend has no such type (gloo: bf16)."""
    wire = rows.float() if rows.device.type == 'cpu' and rows.dtype == torch.bfloat16 else rows
    out = wire.new_empty(sum(output_splits), *rows.shape[1:])
    out = dist_fn.all_to_all_single(out, wire.contiguous(), output_splits, input_splits,
                                    group=groups.expert_group)
    return out.to(rows.dtype)


ExpertsFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def run_experts_parallel(rows: Tensor, tokens_per_expert: Tensor, groups: ExpertParallelGroups,
                         experts: ExpertsFn) -> Tensor:
    """Compute every row on the rank that holds its expert and bring the results back.

    Args:
        rows (Tensor): the layer's expert input, (N, D): the kept rows grouped by (global)
            expert first, then the dropped ones.
        tokens_per_expert (Tensor): kept rows of each of the E experts, shape (E,).
        groups (ExpertParallelGroups): the expert-parallel group.
        experts (callable): runs this rank's E/P experts as ``experts(x, group_end,
            row_expert, sizes)`` on rows grouped by local expert (see ``ResidualExperts``).

    Returns:
        Tensor: (N, D), each kept row's expert output in ``rows``' order; dropped rows zero.
    """
    size = groups.size
    received_counts = exchanged_counts(tokens_per_expert, groups)
    per_rank = tokens_per_expert.view(size, -1)
    local_sizes = received_counts.sum(0)
    host = torch.cat([per_rank.sum(1), received_counts.sum(1), local_sizes]).tolist()
    send, receive, sizes = host[:size], host[size:2 * size], host[2 * size:]
    kept = sum(send)
    received = all_to_all(rows[:kept], receive, send, groups)

    # Arrival order is (source rank, local expert); the experts want rows grouped by expert.
    num_local = len(sizes)
    local_ids = torch.arange(num_local, device=rows.device)
    arrival_expert = torch.repeat_interleave(local_ids.repeat(size), received_counts.flatten(),
                                             output_size=sum(receive))
    order = torch.argsort(arrival_expert, stable=True)
    row_expert = torch.repeat_interleave(local_ids, local_sizes, output_size=sum(receive))
    group_end = torch.cumsum(local_sizes, 0).to(torch.int32)
    computed = experts(received.index_select(0, order), group_end, row_expert,
                       torch.tensor(sizes + [0]))  # on the host, as DispatchPlan.group_sizes
    back = all_to_all(computed.index_select(0, inverse_permutation(order)), send, receive,
                      groups)
    return torch.cat([back, back.new_zeros(rows.shape[0] - kept, *back.shape[1:])])


class DataParallelExpertGrad(torch.autograd.Function):
    """Identity whose backward averages an expert parameter's gradient as data parallelism
    would: the backward of the token exchange already summed, into the rank that holds the
    expert, the gradients of the losses of every rank of its group; the ranks holding the
    same expert in the other groups add theirs, and DDP's mean over the world divides by W.

    A graph node rather than a tensor hook on the parameter: activation checkpointing
    without re-entry bypasses such hooks for tensors an ``autograd.Function`` saves.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, groups: ExpertParallelGroups) -> Tensor:
        ctx.groups = groups
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad / ctx.groups.world_size
        if ctx.groups.replicate_group is not None:
            dist.all_reduce(grad, group=ctx.groups.replicate_group)
        return grad, None


def inverse_permutation(order: Tensor) -> Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def gather_expert_rows(tensor: Tensor, groups: ExpertParallelGroups) -> Tensor:
    """Every rank's share of a per-expert tensor (E/P, ...) as the full (E, ...), on every
    rank of the group (collective)."""
    shards = [torch.empty_like(tensor) for _ in range(groups.size)]
    dist.all_gather(shards, tensor.contiguous(), group=groups.expert_group)
    return torch.cat(shards)


def gather_expert_rows_to(tensor: Tensor, groups: ExpertParallelGroups,
                          dst: int) -> Optional[Tensor]:
    """The full (E, ...) tensor on the CPU of global rank ``dst`` (None elsewhere); every rank
    of the group calls it. Only one full tensor exists on the device at a time."""
    shards = ([torch.empty_like(tensor) for _ in range(groups.size)]
              if dist.get_rank() == dst else None)
    dist.gather(tensor.contiguous(), shards, dst=dst, group=groups.expert_group)
    return None if shards is None else torch.cat(shards).cpu()


def rank0_copy(tensor: Tensor) -> Tensor:
    """``tensor`` as global rank 0 has it, on every rank of the world (collective, in place)."""
    dist.broadcast(tensor, src=0)
    return tensor
