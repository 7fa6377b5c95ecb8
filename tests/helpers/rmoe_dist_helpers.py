"""Test-only hooks and workers for the multi-process tests (tests/test_distributed.py).

Imported by the training processes through the ``custom_imports`` of
``tiny_rmoe_upernet_ade20k_steady.py`` (``tests/helpers`` on ``PYTHONPATH``).
"""
import hashlib
import json
import os
import sys

import torch
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


def tensor_checksum(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes: equal only for bit-identical tensors."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


@HOOKS.register_module()
class ReplicaChecksumHook(Hook):
    """After training, writes this rank's checksum of every parameter and buffer.

    Output: ``work_dir/rank{r}.json`` with ``rank``, ``world_size``, ``iter`` and
    ``checksums`` (state-dict key -> sha256).
    """
    priority = 'LOWEST'

    def after_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        rank, world_size = get_dist_info()
        record = dict(rank=rank, world_size=world_size, iter=runner.iter,
                      checksums={k: tensor_checksum(v) for k, v in model.state_dict().items()})
        with open(os.path.join(runner.work_dir, f'rank{rank}.json'), 'w') as f:
            json.dump(record, f)


@HOOKS.register_module()
class SaveAtTrainStartHook(Hook):
    """Saves ``work_dir/train_start.pth`` when training starts: after a resume, the state as
    this run holds it (gathered from every rank as any checkpoint is)."""
    priority = 'LOWEST'

    def before_train(self, runner) -> None:
        runner.save_checkpoint(runner.work_dir, 'train_start.pth')


@HOOKS.register_module()
class ExitAtIterHook(Hook):
    """Ends the process at once, as a kill would (no clean-up), after training iteration
    ``iteration`` (1-based); it runs after the checkpoint hook of that iteration."""
    priority = 'LOWEST'

    def __init__(self, iteration: int, code: int = 3):
        self.iteration = iteration
        self.code = code

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.iteration:
            runner.logger.info(f'ExitAtIterHook: exiting after iteration {self.iteration}')
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.code)


def sync_bn_worker(rank: int, world_size: int, port: int) -> None:
    """One process of the CPUSyncBatchNorm check: its share of a global batch against
    ``nn.BatchNorm2d`` on the whole batch (outputs, input and parameter gradients, running
    statistics), in float64. Raises AssertionError on a mismatch."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from rmoe_plugin.engine.launch import CPUSyncBatchNorm, init_cpu_process_group
    init_cpu_process_group('pytorch')
    try:
        torch.manual_seed(0)
        x = torch.randn(3 * world_size, 4, 5, 6, dtype=torch.float64) * 3 + 2
        target = torch.randn_like(x)
        reference = torch.nn.BatchNorm2d(4).double()
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-1, 1)
        synced = CPUSyncBatchNorm(4).double()
        synced.load_state_dict(reference.state_dict())
        whole = x.clone().requires_grad_()
        expected = reference(whole)
        (expected * target).sum().backward()
        part = slice(3 * rank, 3 * rank + 3)
        mine = x[part].clone().requires_grad_()
        out = synced(mine)
        (out * target[part]).sum().backward()
        torch.testing.assert_close(out, expected[part].detach())
        torch.testing.assert_close(mine.grad, whole.grad[part])
        for name in ('weight', 'bias'):
            grad = getattr(synced, name).grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, getattr(reference, name).grad)
        for name in ('running_mean', 'running_var', 'num_batches_tracked'):
            torch.testing.assert_close(getattr(synced, name), getattr(reference, name))
    finally:
        dist.destroy_process_group()


def routing_totals_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One process of the evaluation-statistics check: the same MoE layer (seed 0) on this
    rank's own batch (seed ``rank``), totals summed over the ranks by
    ``RoutingTotals.all_reduce``; a second set of totals that only rank 0 feeds. Writes
    ``rank{r}.pt`` with both summaries."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from rmoe_plugin.engine.hooks import RoutingTotals
    from rmoe_plugin.engine.launch import init_cpu_process_group
    init_cpu_process_group('pytorch')
    try:
        layer = routing_layer()
        totals, only_rank0 = (RoutingTotals(layer.num_experts, layer.top_k) for _ in range(2))
        with torch.no_grad():
            layer(routing_batch(rank))
        totals.add(layer.last_stats)
        if rank == 0:
            only_rank0.add(layer.last_stats)
        totals.all_reduce(torch.device('cpu'))
        only_rank0.all_reduce(torch.device('cpu'))
        torch.save(dict(summed=totals.summary(), only_rank0=only_rank0.summary()),
                   os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def routing_layer():
    """A 4-expert MoE layer with a capacity that drops tokens, the same on every rank."""
    from rmoe_plugin.moe import MoEFeedForward
    torch.manual_seed(0)
    return MoEFeedForward(8, 16, num_experts=4, capacity_factor=0.5,
                          eval_capacity_factor=0.5).eval()


def routing_batch(seed: int) -> torch.Tensor:
    return torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(seed)) * (1 + seed)
