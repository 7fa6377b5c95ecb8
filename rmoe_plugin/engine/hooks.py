"""``MoEStatsHook``: routing statistics of every MoE layer in the log and visualizer backends.

Per MoE layer (named by its module path, e.g. ``backbone.stages.2.blocks.1.ffn``) the hook
writes ``moe/<layer>/load/<e>`` (share of the assignments that went to expert e),
``moe/<layer>/drop_fraction``, ``moe/<layer>/importance_cv`` (std / mean of the summed router
probabilities) and ``moe/<layer>/router_entropy`` (mean entropy of the router probabilities, at
most log E) into the runner's message hub. mmengine's ``LoggerHook`` then prints them and
passes them to ``runner.visualizer.add_scalars`` (TensorBoard, WandB, ...). No key holds
'loss', so they are logged and never optimised.

Training: the last forward's statistics, every ``interval`` iterations (as ``LoggerHook``
counts them, so with the same interval every log line carries fresh values). Validation and
test: summed over every forward of the loop, logged with the epoch's metrics. The layers
compute their statistics anyway; the hook only reads them, and reads them back from the
device once per logging step, never in between.
"""
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from ..moe import MoEFeedForward

STAT_NAMES = ('drop_fraction', 'importance_cv', 'router_entropy')


def find_moe_layers(model: nn.Module) -> List[Tuple[str, MoEFeedForward]]:
    """Every MoE layer of ``model`` with its log name.

    An ``RMoEFFN`` keeps its ``MoEFeedForward`` as ``.moe``; the name is the ``RMoEFFN``'s
    path (the FFN's place in the network), a bare ``MoEFeedForward`` keeps its own.
    """
    if is_model_wrapper(model):
        model = model.module
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            name = name[:-len('.moe')] if name.endswith('.moe') else name
            layers.append((name or type(module).__name__, module))
    return layers


class RoutingTotals:
    """Routing statistics of one MoE layer summed over forwards, kept on the layer's device.

    Args:
        num_experts (int): E.
        top_k (int): experts per token.
    """

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts = num_experts
        self.top_k = top_k
        self.load: Optional[torch.Tensor] = None  # assignments before the capacity cut, (E,)
        self.kept: Optional[torch.Tensor] = None  # assignments kept, (E,)
        self.importance: Optional[torch.Tensor] = None  # summed router probabilities, (E,)
        self.entropy_sum: Optional[torch.Tensor] = None  # sum over tokens of the entropy

    def add(self, stats: Dict[str, torch.Tensor]) -> None:
        """Add one forward's ``MoEFeedForward.last_stats`` (device ops only, no sync)."""
        tokens = stats['expert_load'].sum() / self.top_k
        parts = dict(load=stats['expert_load'], kept=stats['tokens_per_expert'],
                     importance=stats['importance'],
                     entropy_sum=stats['router_entropy'] * tokens)
        for name, value in parts.items():
            total = getattr(self, name)
            setattr(self, name, value.detach().double() if total is None else total + value)

    def all_reduce(self, device: torch.device) -> None:
        """Sum the totals over every rank, so the evaluation statistics cover the whole
        dataset and not rank 0's share. Nothing to do without distributed training."""
        if get_world_size() == 1:
            return
        flat = (torch.zeros(3 * self.num_experts + 1, dtype=torch.float64, device=device)
                if self.load is None else
                torch.cat([self.load, self.kept, self.importance, self.entropy_sum[None]]))
        all_reduce(flat, op='sum')
        if flat[:self.num_experts].sum() > 0:
            self.load, self.kept, self.importance, entropy = flat.split(
                [self.num_experts] * 3 + [1])
            self.entropy_sum = entropy[0]

    def summary(self) -> Optional[torch.Tensor]:
        """``[load_0 .. load_{E-1}, drop_fraction, importance_cv, router_entropy]`` on the
        device, or None before any forward."""
        if self.load is None:
            return None
        assignments = self.load.sum().clamp(min=1)
        importance = self.importance
        cv = importance.std(unbiased=False) / importance.mean().clamp(min=1e-12)
        stats = torch.stack([1 - self.kept.sum() / assignments, cv,
                             self.entropy_sum * self.top_k / assignments])
        return torch.cat([self.load / assignments, stats])


def summary_keys(layer: str, num_experts: int) -> List[str]:
    """The message-hub keys of :meth:`RoutingTotals.summary`, without the mode prefix."""
    return ([f'moe/{layer}/load/{e}' for e in range(num_experts)]
            + [f'moe/{layer}/{name}' for name in STAT_NAMES])


def routing_summary(layers: List[Tuple[str, RoutingTotals]]) -> Dict[str, float]:
    """Every layer's summary as ``{key: value}``, read back from the device in one transfer."""
    keys, values = [], []
    for name, totals in layers:
        summary = totals.summary()
        if summary is not None:
            keys += summary_keys(name, totals.num_experts)
            values.append(summary.to(torch.float64))
    if not values:
        return {}
    # One device-to-host copy for all layers: the only sync of a logging step.
    flat = torch.cat([v.to(values[0].device) for v in values]).cpu()
    return dict(zip(keys, flat.tolist()))


def last_forward_summary(layers: List[Tuple[str, MoEFeedForward]]) -> Dict[str, float]:
    """Summary of each layer's last forward (layers that have not run yet are left out)."""
    totals = []
    for name, layer in layers:
        total = RoutingTotals(layer.num_experts, layer.top_k)
        if layer.last_stats:
            total.add(layer.last_stats)
        totals.append((name, total))
    return routing_summary(totals)


@HOOKS.register_module()
class MoEStatsHook(Hook):
    """Logs per-layer expert load, drop fraction, importance CV and router entropy.

    Use it from any mmseg or mmdet config:
    ``custom_hooks = [dict(type='MoEStatsHook', interval=50)]``.

    Args:
        interval (int): log the training statistics every ``interval`` iterations (of the
            epoch, as ``LoggerHook`` counts them) and at the end of each epoch; give it
            ``LoggerHook``'s interval so every log line is fresh. Default: 50.
        log_eval (bool): also log validation and test statistics, summed over the loop.
            Default: True.
    """
    priority = 'NORMAL'  # before LoggerHook (BELOW_NORMAL), which prints what we write

    def __init__(self, interval: int = 50, log_eval: bool = True):
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f'interval must be an int >= 1, got {interval!r}')
        self.interval = interval
        self.log_eval = log_eval
        self._layers: Optional[List[Tuple[str, MoEFeedForward]]] = None
        self._eval_totals: List[Tuple[str, RoutingTotals]] = []
        self._handles: list = []

    def moe_layers(self, runner) -> List[Tuple[str, MoEFeedForward]]:
        if self._layers is None:
            self._layers = find_moe_layers(runner.model)
            if not self._layers:
                runner.logger.warning('MoEStatsHook: the model has no MoE layer; nothing to log')
        return self._layers

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not (self.every_n_inner_iters(batch_idx, self.interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx)):
            return
        summary = last_forward_summary(self.moe_layers(runner))
        runner.message_hub.update_scalars({f'train/{k}': v for k, v in summary.items()})

    def before_val_epoch(self, runner) -> None:
        self._start_eval(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._finish_eval(runner, 'val')

    def before_test_epoch(self, runner) -> None:
        self._start_eval(runner)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._finish_eval(runner, 'test')

    def _start_eval(self, runner) -> None:
        """Sum every forward of the loop: one iteration may run the backbone several times
        (sliding-window inference, test-time augmentation)."""
        self._remove_handles()
        if not self.log_eval:
            return
        self._eval_totals = []
        for name, layer in self.moe_layers(runner):
            totals = RoutingTotals(layer.num_experts, layer.top_k)
            self._handles.append(layer.register_forward_hook(
                lambda module, args, output, totals=totals: totals.add(module.last_stats)))
            self._eval_totals.append((name, totals))

    def _finish_eval(self, runner, mode: str) -> None:
        self._remove_handles()
        if not self.log_eval:
            return
        layers = dict(self.moe_layers(runner))
        for name, totals in self._eval_totals:
            totals.all_reduce(next(layers[name].parameters()).device)
        summary = routing_summary(self._eval_totals)
        runner.message_hub.update_scalars({f'{mode}/{k}': v for k, v in summary.items()})
        self._eval_totals = []

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def after_run(self, runner) -> None:
        self._remove_handles()
