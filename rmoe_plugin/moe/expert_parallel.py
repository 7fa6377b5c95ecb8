"""Expert parallelism for a whole model: split the experts, keep gradients and checkpoints right.

A plain PyTorch training loop turns it on with one call, before DDP::

    dist.init_process_group(...)
    enable_expert_parallel(model, expert_parallel_size=P)   # each rank keeps E/P experts
    ddp = DistributedDataParallel(model)                     # and DDP leaves them alone
    ...
    with gathered_experts(model, optimizers=[optimizer]):    # every rank enters
        if dist.get_rank() == 0:
            torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict()), path)

The state dicts saved that way hold all E experts, as a run without expert parallelism saves
them, so they load on any P: ``model.load_state_dict`` takes each rank's share, and
``shard_optimizer_state(optimizer)`` does the same for a loaded optimizer state.
``model.state_dict()`` outside ``gathered_experts`` is collective (every rank must call it).
"""
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .expert_exchange import (ExpertParallelGroups, expert_parallel_groups,
                              gather_expert_rows_to, rank0_copy)
from .experts import ResidualExperts
from .layer import MoEFeedForward


def moe_layers(model: nn.Module) -> List[Tuple[str, MoEFeedForward]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def enable_expert_parallel(model: nn.Module, expert_parallel_size: Optional[int] = None,
                           groups: Optional[ExpertParallelGroups] = None
                           ) -> ExpertParallelGroups:
    """Split the experts of every MoE layer of ``model`` over an expert-parallel group.

    Call it on every rank, on the module DDP will wrap, before wrapping it. Each rank keeps
    rank 0's residuals of its E/P experts (the core and the router stay whole, and DDP
    broadcasts and averages them as usual); the residuals are left out of DDP
    (``_ddp_params_and_buffers_to_ignore``) and the layer averages their gradients itself
    (``DataParallelExpertGrad``), so that a step equals a data-parallel step on the same
    global batch.

    Args:
        model (nn.Module): holds ``MoEFeedForward`` layers.
        expert_parallel_size (int, optional): P; groups of P consecutive ranks share out the
            experts. Default: the world size.
        groups (ExpertParallelGroups, optional): groups made already, instead of P, e.g.
            ``ExpertParallelGroups.from_mesh(mesh)`` for a ``DeviceMesh``.

    Returns:
        ExpertParallelGroups

    Raises:
        ValueError: ``model`` has no MoE layer or is split already, or P does not divide the
            world size or some layer's number of experts.
    """
    if groups is None:
        if expert_parallel_size is None and dist.is_initialized():
            expert_parallel_size = dist.get_world_size()
        groups = expert_parallel_groups(expert_parallel_size)
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no MoEFeedForward layer to split')
    for name, layer in layers:
        if layer.experts.parallel is not None:
            raise ValueError(f'{name or type(model).__name__}: experts are split already')
        if layer.num_experts % groups.size:
            raise ValueError(f'expert_parallel_size={groups.size} must divide num_experts='
                             f'{layer.num_experts} of {name or type(model).__name__}')
    ignored = []
    for name, layer in layers:
        prefix = f'{name}.experts.' if name else 'experts.'
        ignored += [prefix + n for n in _shard_layer(layer.experts, groups)]
    previous = list(getattr(model, '_ddp_params_and_buffers_to_ignore', []))
    model._ddp_params_and_buffers_to_ignore = previous + ignored
    return groups


def _shard_layer(experts: ResidualExperts, groups: ExpertParallelGroups) -> List[str]:
    for _, p in experts.named_residuals():
        rank0_copy(p.data)  # what DDP's broadcast would have made of every replica
    experts.shard_(groups)
    for _, p in experts.named_residuals():
        p.expert_parallel = groups
    return [name for name, _ in experts.named_residuals()]


def _sharded_experts(modules: Sequence[nn.Module]) -> List[ResidualExperts]:
    return [m for module in modules for m in module.modules()
            if isinstance(m, ResidualExperts) and m.parallel is not None]


def _expert_params(optimizer: torch.optim.Optimizer) -> List[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group['params']
            if getattr(p, 'expert_parallel', None) is not None]


def _is_per_expert(value, param: Tensor, num_rows: int) -> bool:
    return (torch.is_tensor(value) and value.dim() == param.dim()
            and value.shape[0] == num_rows and value.shape[1:] == param.shape[1:])


@contextmanager
def gathered_experts(*modules: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = (),
                     dst: int = 0):
    """Inside, global rank ``dst``'s ``state_dict()`` of ``modules`` and of ``optimizers``
    hold all E experts (on the CPU), without any further collective.

    Every rank must enter it with the same modules and optimizers in the same order; only
    the expert-parallel group that holds ``dst`` exchanges anything, one tensor at a time.
    """
    optimizers = list(optimizers)
    sharded = _sharded_experts(modules)
    saving = dist.get_rank() == dst
    swapped = []
    try:
        for experts in sharded:
            if dst in experts.parallel.expert_ranks:
                full = {name: gather_expert_rows_to(p.detach(), experts.parallel, dst)
                        for name, p in experts.named_residuals()}
                experts.full_residuals = full if saving else None
        for optimizer in optimizers:
            for p in _expert_params(optimizer):
                if dst not in p.expert_parallel.expert_ranks or p not in optimizer.state:
                    continue
                state = optimizer.state[p]
                full = {k: gather_expert_rows_to(v, p.expert_parallel, dst)
                        if _is_per_expert(v, p, p.shape[0]) else v for k, v in state.items()}
                if saving:
                    swapped.append((optimizer, p, state))
                    optimizer.state[p] = full
        yield
    finally:
        for experts in sharded:
            experts.full_residuals = None
        for optimizer, p, state in swapped:
            optimizer.state[p] = state


@torch.no_grad()
def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a state saved with all E experts: keep this
    rank's share of every expert-parallel parameter's state. A share already is kept as is.

    Raises:
        ValueError: a state holds neither this rank's share nor all E experts.
    """
    for p in _expert_params(optimizer):
        groups = p.expert_parallel
        num_experts = p.shape[0] * groups.size
        local = groups.local_experts(num_experts)
        state = optimizer.state.get(p, {})
        for key, value in list(state.items()):
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if _is_per_expert(value, p, num_experts):
                state[key] = value[local.start:local.stop].clone()
            elif not _is_per_expert(value, p, p.shape[0]):
                raise ValueError(f'optimizer state {key!r} of shape {tuple(value.shape)} holds '
                                 f'neither all {num_experts} experts nor this rank\'s '
                                 f'{p.shape[0]}: it was saved for another number of experts')


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model when experts are split: the
    expert-parallel parameters' share of the norm is summed over their group, so every rank
    clips by the same global norm, the one data parallelism would compute."""
    params = [p for p in ([parameters] if torch.is_tensor(parameters) else parameters)
              if p.grad is not None]
    norm_type = float(norm_type)
    shared, expert_groups, expert_grads = [], {}, defaultdict(list)
    for p in params:
        groups = getattr(p, 'expert_parallel', None)
        if groups is None:
            shared.append(p.grad)
        else:
            expert_groups[id(groups)] = groups
            expert_grads[id(groups)].append(p.grad)
    norm = partial(torch.nn.utils.get_total_norm, norm_type=norm_type,
                   error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    total = norm(shared) if shared else None
    for key, groups in expert_groups.items():
        part = norm(expert_grads[key])
        if norm_type == float('inf'):
            dist.all_reduce(part, op=dist.ReduceOp.MAX, group=groups.expert_group)
            total = part if total is None else torch.maximum(total, part.to(total.device))
        else:
            part = part.pow(norm_type)
            dist.all_reduce(part, group=groups.expert_group)
            total = part.pow(1 / norm_type) if total is None else (
                total.pow(norm_type) + part.to(total.device)).pow(1 / norm_type)
    if total is None:
        return torch.tensor(0.0)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=foreach)
    return total
