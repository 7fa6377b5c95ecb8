"""Workers of the expert-parallel layer tests (tests/test_expert_parallel.py); plain PyTorch.

Each of W gloo processes holds the same MoE layer and the same global batch of W shards. The
reference is data parallelism computed in one process: the whole layer on every shard, the
mean of the shards' losses, one AdamW step. The expert-parallel run is the same layer with its
experts split over groups of P ranks and the rest wrapped in DDP, each rank on its own shard.
"""
import copy
import os

import torch
import torch.distributed as dist
import torch.utils.checkpoint as cp
from torch.nn.parallel import DistributedDataParallel

from rmoe_plugin.moe import (ExpertParallelGroups, MoEFeedForward, clip_grad_norm_,
                             enable_expert_parallel, gathered_experts, shard_optimizer_state)

EMBED, HIDDEN, EXPERTS, TOKENS = 8, 16, 4, 24
CASES = {
    'top-1, capacity drops': dict(top_k=1, capacity_factor=0.5),
    'top-2, capacity drops': dict(top_k=2, capacity_factor=0.75),
    'top-2, dropless': dict(top_k=2, capacity_factor=None),
}


def start(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group('gloo')


def starved_layer(backend: str = 'loop', **moe_args) -> MoEFeedForward:
    """The layer of every check (seed 0); its last expert never wins a token (see batch)."""
    torch.manual_seed(0)
    layer = MoEFeedForward(EMBED, HIDDEN, num_experts=EXPERTS, residual_init_std=0.05,
                           importance_loss_weight=0.01, balance_loss_weight=0.01,
                           z_loss_weight=0.001, expert_backend=backend, **moe_args)
    with torch.no_grad():
        layer.router.weight[-1] = -_direction()
    return layer


def _direction() -> torch.Tensor:
    return torch.nn.functional.normalize(torch.ones(EMBED), dim=0)


def global_batch(world_size: int):
    """W shards of tokens far along the direction the last expert's router row points
    away from, and the targets of a linear loss."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(world_size, TOKENS, EMBED, generator=generator) + 10 * _direction()
    return x, torch.randn(world_size, TOKENS, EMBED, generator=generator)


def shard_loss(layer, out, target):
    return (out * target).sum() + sum(layer.last_losses.values())


def data_parallel_reference(layer, x, target, dtype=None):
    """Outputs, input gradients and statistics per shard; parameter gradients of the mean
    of the shards' losses."""
    world_size = x.shape[0]
    outputs, input_grads, stats, total = [], [], [], 0
    inputs = [x[r].clone().requires_grad_() for r in range(world_size)]
    for r, shard in enumerate(inputs):
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = layer(shard)
        total = total + shard_loss(layer, out.float(), target[r]) / world_size
        outputs.append(out.detach())
        stats.append({k: v.detach().clone() for k, v in layer.last_stats.items()})
    total.backward()
    input_grads = [shard.grad * world_size for shard in inputs]
    return outputs, input_grads, stats


class Checkpointed(torch.nn.Module):
    """``layer`` under activation checkpointing without re-entry (``with_cp=True``)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return cp.checkpoint(self.layer, x, use_reentrant=False)


def compare_step(rank, world_size, expert_parallel_size, case, backend='loop', dtype=None,
                 clip=None, checkpointed=False, groups=None):
    """One training step, expert-parallel against the data-parallel reference."""
    tol = dict(atol=1e-5, rtol=1e-5) if dtype is None else dict(atol=2e-2, rtol=2e-2)
    reference = starved_layer(backend, **CASES[case])
    layer = copy.deepcopy(reference)
    x, target = global_batch(world_size)
    outputs, input_grads, stats = data_parallel_reference(reference, x, target, dtype)

    model = Checkpointed(layer) if checkpointed else layer
    groups = enable_expert_parallel(model, expert_parallel_size, groups)
    ddp = DistributedDataParallel(model)
    shard = x[rank].clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = ddp(shard)
    shard_loss(layer, out.float(), target[rank]).backward()

    torch.testing.assert_close(out, outputs[rank], **tol)
    torch.testing.assert_close(shard.grad, input_grads[rank], **tol)
    for key in ('tokens_per_expert', 'expert_load', 'drop_fraction', 'importance'):
        torch.testing.assert_close(layer.last_stats[key], stats[rank][key], msg=key)
    assert stats[rank]['tokens_per_expert'][-1] == 0  # the starved expert
    if CASES[case]['capacity_factor'] is not None:
        dropped = sum(float(s['drop_fraction']) for s in stats)
        assert dropped > 0, f'{case}: no assignment was dropped, capacity untested'
    local = groups.local_experts(EXPERTS)
    expected = dict(reference.named_parameters())
    for name, p in layer.named_parameters():
        want = expected[name].grad
        if 'residual' in name:
            want = want[local.start:local.stop]
        torch.testing.assert_close(p.grad, want, **tol, msg=name)

    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
                  for m in (reference, layer)]
    if clip is not None:
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        norm = clip_grad_norm_(layer.parameters(), clip)
        torch.testing.assert_close(norm, ref_norm, **tol)
    for optimizer in optimizers:
        optimizer.step()
    for name, p in layer.named_parameters():
        want = expected[name].detach()
        if 'residual' in name:
            want = want[local.start:local.stop]
        torch.testing.assert_close(p.detach(), want, **tol, msg=lambda m: f'{name} after AdamW ' + m)
    return reference, layer, optimizers


def layer_step_worker(rank: int, world_size: int, port: int, expert_parallel_size: int) -> None:
    start(rank, world_size, port)
    try:
        for case in CASES:
            compare_step(rank, world_size, expert_parallel_size, case)
        compare_step(rank, world_size, expert_parallel_size, 'top-1, capacity drops',
                     backend='grouped_mm', clip=0.5)
        compare_step(rank, world_size, expert_parallel_size, 'top-2, capacity drops',
                     dtype=torch.bfloat16)
        compare_step(rank, world_size, expert_parallel_size, 'top-2, dropless',
                     checkpointed=True)
        if world_size > expert_parallel_size:  # the same groups from a DeviceMesh
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh('cpu', (world_size // expert_parallel_size,
                                            expert_parallel_size),
                                    mesh_dim_names=('replicate', 'expert'))
            compare_step(rank, world_size, None, 'top-1, capacity drops',
                         groups=ExpertParallelGroups.from_mesh(mesh))
        check_eval(rank, world_size, expert_parallel_size)
    finally:
        dist.destroy_process_group()


def check_eval(rank, world_size, expert_parallel_size):
    """Dropless evaluation (the default eval capacity) without gradients."""
    reference = starved_layer(top_k=2).eval()
    layer = copy.deepcopy(reference)
    enable_expert_parallel(layer, expert_parallel_size)
    x, _ = global_batch(world_size)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[rank]), reference(x[rank]), atol=1e-5, rtol=1e-5)


def checkpoint_worker(rank: int, world_size: int, port: int, expert_parallel_size: int,
                      folder: str) -> None:
    """Saves the state after one step at P (rank 0 writes), or, where ``step.pt`` exists,
    loads it at this P and checks that the state gathered again is the saved one."""
    start(rank, world_size, port)
    path = os.path.join(folder, 'step.pt')
    try:
        reference = starved_layer(top_k=1, capacity_factor=0.5)
        layer = copy.deepcopy(reference)
        enable_expert_parallel(layer, expert_parallel_size)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05)
        if not os.path.exists(path):
            x, target = global_batch(world_size)
            shard_loss(layer, layer(x[rank]), target[rank]).backward()
            optimizer.step()
            with gathered_experts(layer, optimizers=[optimizer]):
                if rank == 0:
                    torch.save(dict(model=layer.state_dict(), optimizer=optimizer.state_dict()),
                               path)
            return
        saved = torch.load(path)
        layer.load_state_dict(saved['model'])
        optimizer.load_state_dict(saved['optimizer'])
        shard_optimizer_state(optimizer)
        with gathered_experts(layer, optimizers=[optimizer]):
            if rank == 0:
                again = dict(model=layer.state_dict(), optimizer=optimizer.state_dict())
                for key, value in saved['model'].items():
                    assert torch.equal(again['model'][key], value), key
                for index, state in saved['optimizer']['state'].items():
                    for key, value in state.items():
                        assert torch.equal(again['optimizer']['state'][index][key], value)
        # and training goes on from there
        x, target = global_batch(world_size)
        shard_loss(layer, layer(x[rank]), target[rank]).backward()
        optimizer.step()
    finally:
        dist.destroy_process_group()


def bad_input_worker(rank: int, world_size: int, port: int) -> None:
    """Expert-parallel sizes that cannot work are refused, naming the values."""
    import pytest
    start(rank, world_size, port)
    try:
        with pytest.raises(ValueError, match=r'divide the world size \(2 processes\), got 4'):
            enable_expert_parallel(starved_layer(), 4)
        with pytest.raises(ValueError, match='expert_parallel_size=2 must divide num_experts=3'):
            enable_expert_parallel(MoEFeedForward(EMBED, HIDDEN, num_experts=3), 2)
        layer = starved_layer()
        enable_expert_parallel(layer, 2)
        with pytest.raises(ValueError, match='split already'):
            enable_expert_parallel(layer, 2)
        with pytest.raises(ValueError, match='no MoEFeedForward'):
            enable_expert_parallel(torch.nn.Linear(2, 2), 2)
    finally:
        dist.destroy_process_group()
