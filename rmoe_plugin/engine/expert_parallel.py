"""Expert parallelism in mmengine: one model wrapper, and checkpoints that hold every expert.

``model_wrapper_cfg=dict(type='RMoEDistributedDataParallel', expert_parallel_size=P)`` in a
config splits the experts of every RMoE layer over groups of P ranks (see
:mod:`rmoe_plugin.moe.expert_parallel`) and lets DDP handle the rest of the model.

mmengine saves checkpoints on rank 0 alone (``Runner.save_checkpoint`` is ``master_only``), so
the experts held by other ranks must reach rank 0 first: :func:`install_runner_hooks` makes
``Runner.save_checkpoint`` run inside :func:`~rmoe_plugin.moe.gathered_experts` on every rank
(the model, every module a hook holds, such as ``EMAHook``'s averaged model, and the
optimizer state), and ``Runner.resume`` keep each rank's share of the optimizer state it
loads. The model's own share is taken by its ``load_state_dict``. Without an expert-parallel
layer both run unchanged.
"""
import functools
from typing import List

import torch
from mmengine.model import MMDistributedDataParallel, is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import MODEL_WRAPPERS
from mmengine.runner import Runner
from torch import nn

from ..moe import ResidualExperts, enable_expert_parallel, gathered_experts
from ..moe import clip_grad_norm_ as expert_parallel_clip_grad_norm_
from ..moe import shard_optimizer_state


@MODEL_WRAPPERS.register_module()
class RMoEDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` with the experts of every RMoE layer split over ranks.

    Each group of P consecutive ranks shares out the experts (E/P per rank; tokens travel to
    them by all-to-all); the core, the router and everything else are replicated and
    averaged by DDP. A step equals a data-parallel step on the same global batch, gradient
    clipping by norm included. Checkpoints hold all E experts and load on any P.

    Args:
        module (nn.Module): the model; it must hold RMoE layers.
        expert_parallel_size (int, optional): P, dividing the world size and every layer's
            number of experts. Default: the world size.
        **kwargs: ``MMDistributedDataParallel``'s (DDP's) arguments.
    """

    def __init__(self, module: nn.Module, expert_parallel_size=None, **kwargs):
        groups = enable_expert_parallel(module, expert_parallel_size)
        super().__init__(module=module, **kwargs)
        self.expert_parallel = groups

    def train_step(self, data, optim_wrapper):
        for wrapper in _optim_wrappers(optim_wrapper):
            # Each rank holds other experts: the norm must be summed over the group.
            if getattr(wrapper, 'clip_func', None) is torch.nn.utils.clip_grad_norm_:
                wrapper.clip_func = expert_parallel_clip_grad_norm_
        return super().train_step(data, optim_wrapper)


def _optim_wrappers(optim_wrapper) -> List[OptimWrapper]:
    if isinstance(optim_wrapper, OptimWrapperDict):
        return list(optim_wrapper.optim_wrappers.values())
    return [optim_wrapper] if isinstance(optim_wrapper, OptimWrapper) else []


def _optimizers(runner: Runner) -> List[torch.optim.Optimizer]:
    return [wrapper.optimizer for wrapper in _optim_wrappers(runner.optim_wrapper)]


def expert_parallel_modules(runner: Runner) -> List[nn.Module]:
    """The runner's model and the modules its hooks hold (an EMA model...), those with
    experts split over ranks, in the same order on every rank."""
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    candidates = [model] + [value for hook in runner.hooks for value in vars(hook).values()
                            if isinstance(value, nn.Module)]
    return [module for module in candidates
            if any(isinstance(m, ResidualExperts) and m.parallel is not None
                   for m in module.modules())]


def _save_with_every_expert(save_checkpoint):

    @functools.wraps(save_checkpoint)
    def wrapped(runner, *args, **kwargs):
        modules = expert_parallel_modules(runner)
        if not modules:
            return save_checkpoint(runner, *args, **kwargs)
        with gathered_experts(*modules, optimizers=_optimizers(runner)):
            return save_checkpoint(runner, *args, **kwargs)

    wrapped.rmoe_expert_parallel = True
    return wrapped


def _resume_own_share(resume):

    @functools.wraps(resume)
    def wrapped(runner, *args, **kwargs):
        result = resume(runner, *args, **kwargs)
        for optimizer in _optimizers(runner):
            shard_optimizer_state(optimizer)
        return result

    wrapped.rmoe_expert_parallel = True
    return wrapped


def install_runner_hooks() -> None:
    """Wrap ``Runner.save_checkpoint`` and ``Runner.resume`` (once) as the module says."""
    if not getattr(Runner.save_checkpoint, 'rmoe_expert_parallel', False):
        Runner.save_checkpoint = _save_with_every_expert(Runner.save_checkpoint)
    if not getattr(Runner.resume, 'rmoe_expert_parallel', False):
        Runner.resume = _resume_own_share(Runner.resume)
