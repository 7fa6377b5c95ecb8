"""FLOPs of an MoE model as MoE papers report them.

- dense-equivalent: the same model with every MoE layer a dense FFN of the expert's width;
- activated: what one token really uses, router + its top-k experts;
- executed: what a capacity-padded implementation (GShard, Tutel, Swin-MoE) computes,
  router + ``E * k * ceil(f * S / E)`` expert slots per group of S tokens, padding included
  (dropless: the activated FLOPs). This plugin's index dispatch runs only the kept
  assignments, at most the activated FLOPs.

The rest of the model is counted by mmengine's ``get_model_complexity_info`` on the model's
``forward(mode='tensor')`` with every MoE layer bypassed; the MoE layers are computed
analytically from their widths and the tokens each saw in one forward at the same input size.
Convention (mmengine/fvcore): one multiply-add is one FLOP; biases and activations are free.
"""
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from mmengine.analysis import get_model_complexity_info
from mmengine.logging import MMLogger
from torch import nn

from ..engine.hooks import find_moe_layers
from ..moe import MoEFeedForward
from ..moe.dispatch import expert_capacity


@dataclass
class MoELayerCost:
    """Widths, routing and token counts of one MoE layer, and the FLOPs they imply.

    Attributes:
        name (str): module path of the layer.
        widths (list[int]): widths through the expert FFN, e.g. ``[D, H, D]``.
        num_experts (int): E.
        top_k (int): experts per token.
        capacity_factor (float | None): training capacity factor (None: dropless).
        eval_capacity_factor (float | None): evaluation capacity factor (None: dropless).
        params (int): stored parameters (router, core, residuals).
        calls (list[int]): tokens of each forward (each is one routing group).
        router_flops_per_token (int, optional): multiply-adds of the router per token;
            None: a linear router's ``D * E``.
        router_params (int, optional): the router's parameters; None: ``D * E``.
    """
    name: str
    widths: List[int]
    num_experts: int
    top_k: int
    capacity_factor: Optional[float]
    eval_capacity_factor: Optional[float]
    params: int
    calls: List[int] = field(default_factory=list)
    router_flops_per_token: Optional[int] = None
    router_params: Optional[int] = None

    @classmethod
    def from_layer(cls, name: str, layer: MoEFeedForward) -> 'MoELayerCost':
        weights = layer.experts.core_weights
        widths = [w.shape[1] for w in weights] + [weights[-1].shape[0]]
        return cls(name, widths, layer.num_experts, layer.top_k, layer.capacity_factor,
                   layer.eval_capacity_factor, sum(p.numel() for p in layer.parameters()),
                   router_flops_per_token=layer.router.flops_per_token(),
                   router_params=sum(p.numel() for p in layer.router.parameters()))

    @property
    def tokens(self) -> int:
        return sum(self.calls)

    @property
    def expert_flops_per_token(self) -> int:
        return sum(i * o for i, o in zip(self.widths[:-1], self.widths[1:]))

    @property
    def expert_params(self) -> int:
        """Parameters of one full expert (weights and biases of ``core + residual``)."""
        return sum(i * o + o for i, o in zip(self.widths[:-1], self.widths[1:]))

    @property
    def router_flops(self) -> int:
        per_token = self.router_flops_per_token or self.widths[0] * self.num_experts
        return self.tokens * per_token

    @property
    def dense_flops(self) -> int:
        return self.tokens * self.expert_flops_per_token

    @property
    def activated_flops(self) -> int:
        return self.router_flops + self.top_k * self.dense_flops

    def executed_flops(self, capacity_factor: Optional[float]) -> int:
        """Router + every expert slot of each routing group at ``capacity_factor``."""
        slots = sum(self.top_k * s if capacity_factor is None else
                    self.num_experts * expert_capacity(s, self.num_experts, self.top_k,
                                                       capacity_factor)
                    for s in self.calls)
        return self.router_flops + slots * self.expert_flops_per_token

    @property
    def activated_params(self) -> int:
        """Router + the k experts one token uses (an expert is a full FFN: core + residual)."""
        router = self.router_params or self.widths[0] * self.num_experts
        return router + self.top_k * self.expert_params


@contextmanager
def record_tokens(layers: Dict[str, MoEFeedForward]) -> Iterator[Dict[str, List[int]]]:
    """Tokens of every forward of each layer while the context is open (forward pre-hooks)."""
    calls: Dict[str, List[int]] = {name: [] for name in layers}
    handles = [layer.register_forward_pre_hook(
        lambda module, args, name=name: calls[name].append(args[0].numel() // module.embed_dims))
        for name, layer in layers.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _bypass(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def moe_layers_bypassed(layers: Dict[str, MoEFeedForward]) -> Iterator[None]:
    """Every MoE layer returns its input unchanged (and costs nothing) while open."""
    for layer in layers.values():
        layer.forward = _bypass
    try:
        yield
    finally:
        for layer in layers.values():
            del layer.forward


@contextmanager
def quiet_logger(level: int = logging.ERROR) -> Iterator[None]:
    """Silence mmengine's logger below ``level``: the tracer lists every op it does not count
    and every module it bypassed (the MoE layers, here on purpose)."""
    logger = MMLogger.get_current_instance()
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


class TensorForward(nn.Module):
    """``model.forward(inputs, data_samples, mode='tensor')`` as a one-input module to trace."""

    def __init__(self, model: nn.Module, data_samples: Optional[list]):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs: torch.Tensor):
        return self.model(inputs, self.data_samples, mode='tensor')


def dummy_data_samples(scope: str, hw: Tuple[int, int]) -> Optional[list]:
    """One data sample of the framework's type carrying the metainfo a ``tensor`` forward
    reads (mmdet's RPN needs the image shape); None for other scopes."""
    meta = dict(img_shape=hw, ori_shape=hw, pad_shape=hw, batch_input_shape=hw,
                scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=meta)]
    return None


@torch.no_grad()
def moe_flops_report(model: nn.Module, scope: str, hw: Tuple[int, int]) -> Dict[str, object]:
    """FLOPs and parameters of ``model`` on one ``hw`` image, dense and MoE parts apart.

    Args:
        model (nn.Module): an mmseg segmentor or mmdet detector (put in eval mode here).
        scope (str): its registry scope, 'mmseg' or 'mmdet'.
        hw (tuple[int, int]): input height and width.

    Returns:
        dict: ``dense_rest`` (counted FLOPs outside the MoE layers), ``layers``
        (list of :class:`MoELayerCost`), ``params`` (total) and the model totals
        ``dense_equivalent``, ``activated``, ``executed_train``, ``executed_eval``,
        ``params_activated``.

    Raises:
        ValueError: ``hw`` is not two positive sizes, or the model has no MoE layer.
    """
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f'shape must be two positive sizes (H, W), got {tuple(hw)}')
    model.eval()
    layers = dict(find_moe_layers(model))
    if not layers:
        raise ValueError(f'{type(model).__name__} has no MoE layer')
    wrapped = TensorForward(model, dummy_data_samples(scope, tuple(hw)))
    inputs = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    inputs = inputs.to(next(model.parameters()).device)
    with record_tokens(layers) as calls:
        wrapped(inputs)
    costs = [MoELayerCost.from_layer(name, layer) for name, layer in layers.items()]
    for cost in costs:
        cost.calls = calls[cost.name]
    with moe_layers_bypassed(layers), quiet_logger():
        counted = get_model_complexity_info(wrapped, inputs=(inputs, ), show_table=False,
                                            show_arch=False)
    return summarize(counted['flops'], costs, sum(p.numel() for p in model.parameters()))


def summarize(dense_rest: int, costs: Sequence[MoELayerCost], params: int) -> Dict[str, object]:
    """Model totals from the counted rest and the analytic MoE layers."""
    moe_params = sum(c.params for c in costs)
    return dict(
        dense_rest=dense_rest, layers=list(costs), params=params,
        dense_equivalent=dense_rest + sum(c.dense_flops for c in costs),
        activated=dense_rest + sum(c.activated_flops for c in costs),
        executed_train=dense_rest + sum(c.executed_flops(c.capacity_factor) for c in costs),
        executed_eval=dense_rest + sum(c.executed_flops(c.eval_capacity_factor) for c in costs),
        params_activated=params - moe_params + sum(c.activated_params for c in costs))


def human(count: float) -> str:
    """``1234567`` -> ``'1.23M'`` (three significant digits)."""
    for unit, size in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(count) >= size:
            return f'{count / size:.3g}{unit}'
    return f'{count:.3g}'


def _factor(value: Optional[float]) -> str:
    return 'dropless' if value is None else f'{value:g}'


def format_report(report: Dict[str, object], title: str) -> str:
    """The per-layer and per-model tables that ``tools/get_moe_flops.py`` prints."""
    lines = [title, '',
             f'{"MoE layer":<34} {"tokens":>7} {"widths":>14} {"E":>3} {"k":>2} '
             f'{"cf train":>8} {"cf eval":>8} {"router":>7} {"dense FFN":>9} {"activated":>9}']
    for c in report['layers']:
        lines.append(
            f'{c.name:<34} {c.tokens:>7} {"-".join(map(str, c.widths)):>14} '
            f'{c.num_experts:>3} {c.top_k:>2} {_factor(c.capacity_factor):>8} '
            f'{_factor(c.eval_capacity_factor):>8} {human(c.router_flops):>7} '
            f'{human(c.dense_flops):>9} {human(c.activated_flops):>9}')
    rows = [('FLOPs, rest of the model (counted)', report['dense_rest']),
            ('FLOPs, dense-equivalent', report['dense_equivalent']),
            ('FLOPs, activated (router + top-k)', report['activated']),
            ('FLOPs, executed at train capacity', report['executed_train']),
            ('FLOPs, executed at eval capacity', report['executed_eval']),
            ('params, total', report['params']),
            ('params, activated per token', report['params_activated'])]
    lines += [''] + [f'{name:<38} {human(value):>8}' for name, value in rows]
    return '\n'.join(lines)
