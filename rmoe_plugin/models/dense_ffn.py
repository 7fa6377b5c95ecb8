"""Recognising a dense FFN and taking it apart into what an RMoE layer needs.

Two forms are known: mmcv's ``FFN`` (``layers``: Linear, activation, Dropout blocks and a last
Linear, Dropout; then LayerScale, dropout layer and the identity add), used by every OpenMMLab
transformer; and the ``fc1``, ``act``, ``fc2`` MLP of timm's ``Mlp``, CvT and their like, with
optional ``drop``/``drop1``/``drop2`` dropouts and an empty ``norm``. Anything else (a gated
MLP, a norm or a convolution inside, a projection without bias) is refused by name, since the
RMoE experts could not compute what it computes.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
from mmcv.cnn.bricks.transformer import FFN
from torch import nn

from ..engine.convert import mmcv_ffn_linear_names

MLP_CHILDREN = ('fc1', 'act', 'drop', 'drop1', 'norm', 'fc2', 'drop2')
KNOWN_FORMS = ("an mmcv FFN, or an MLP of fc1 (Linear), act, fc2 (Linear) with optional "
               "dropouts, like timm's Mlp")


@dataclass
class DenseFFN:
    """The parts of a dense FFN.

    Attributes:
        linears: its projections, in order.
        linear_names: their module paths inside the FFN (their state-dict names).
        activation: the activation after every projection but the last.
        dropout: dropout rate after each activation and after the last projection.
        add_identity: whether the FFN adds its input (or the identity it is given).
        dropout_layer: dropout (e.g. DropPath) on the output before the identity add.
        layer_scale: learnt per-channel scale of the output (mmcv ``gamma2``).
        is_mmcv: whether it is an mmcv ``FFN`` (forward takes ``identity``).
    """
    linears: List[nn.Linear]
    linear_names: List[str]
    activation: nn.Module
    dropout: float
    add_identity: bool = False
    dropout_layer: Optional[nn.Module] = None
    layer_scale: Optional[nn.Module] = None
    is_mmcv: bool = False

    @property
    def embed_dims(self) -> int:
        return self.linears[0].in_features

    @property
    def feedforward_channels(self) -> int:
        return self.linears[0].out_features

    @property
    def num_fcs(self) -> int:
        return len(self.linears)


def is_mlp_shaped(module: nn.Module) -> bool:
    """Whether ``module`` has ``fc1``, ``act`` and ``fc2`` and no child beyond MLP_CHILDREN."""
    children = dict(module.named_children())
    return {'fc1', 'act', 'fc2'} <= set(children) and set(children) <= set(MLP_CHILDREN)


def is_dense_ffn(module: nn.Module) -> bool:
    """Whether ``module`` looks like a dense FFN (:func:`describe_dense_ffn` may still refuse
    it, naming what does not fit)."""
    return isinstance(module, FFN) or is_mlp_shaped(module)


def describe_dense_ffn(module: nn.Module, name: str = 'ffn') -> DenseFFN:
    """The parts of the dense FFN ``module``.

    Args:
        module (nn.Module): an mmcv ``FFN`` or an fc1/act/fc2 MLP.
        name (str): how error messages call it (its module path). Default: 'ffn'.

    Raises:
        ValueError: ``module`` is neither, or holds something the experts cannot reproduce.
    """
    if isinstance(module, FFN):
        return _describe_mmcv(module)
    if is_mlp_shaped(module):
        return _describe_mlp(module, name)
    children = ', '.join(n for n, _ in module.named_children()) or 'none'
    raise ValueError(f'{name} ({type(module).__name__}, children: {children}) is not an FFN '
                     f'that RMoE can take over; expected {KNOWN_FORMS}')


def _describe_mmcv(ffn: FFN) -> DenseFFN:
    hidden = list(ffn.layers[:-2])  # (Linear, activation, Dropout) each
    return DenseFFN(
        linears=[h[0] for h in hidden] + [ffn.layers[-2]],
        linear_names=mmcv_ffn_linear_names(ffn.num_fcs), activation=hidden[0][1],
        dropout=hidden[0][2].p, add_identity=ffn.add_identity,
        dropout_layer=ffn.dropout_layer, layer_scale=ffn.gamma2, is_mmcv=True)


def _describe_mlp(mlp: nn.Module, name: str) -> DenseFFN:
    fc1, act, fc2 = mlp.fc1, mlp.act, mlp.fc2
    for part, linear in (('fc1', fc1), ('fc2', fc2)):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f'{name}.{part} is a {type(linear).__name__}; an RMoE expert '
                             'projects with a Linear')
        if linear.bias is None:
            raise ValueError(f'{name}.{part} has no bias; RMoE experts have biases, so the '
                             'FFN could not be folded back into this form')
    if fc1.out_features != fc2.in_features or fc1.in_features != fc2.out_features:
        raise ValueError(
            f'{name}: fc1 maps {fc1.in_features} -> {fc1.out_features} channels but fc2 '
            f'{fc2.in_features} -> {fc2.out_features}; a gated MLP (GluMlp) or a projecting '
            'one is not an FFN RMoE can take over')
    if any(True for _ in act.parameters()):
        raise ValueError(f'{name}.act ({type(act).__name__}) has parameters; RMoE experts '
                         'share a parameter-free activation')
    norm = getattr(mlp, 'norm', None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f'{name}.norm is a {type(norm).__name__} between fc1 and fc2; RMoE '
                         'experts have no norm there (build the MLP with norm_layer=None)')
    rates = {_dropout_rate(getattr(mlp, d), f'{name}.{d}')
             for d in ('drop', 'drop1', 'drop2') if hasattr(mlp, d)}
    if len(rates) > 1:
        raise ValueError(f'{name}: dropout rates {sorted(rates)} differ inside the MLP; RMoE '
                         'experts use one rate after the activation and after fc2')
    described = DenseFFN(linears=[fc1, fc2], linear_names=['fc1', 'fc2'], activation=act,
                         dropout=rates.pop() if rates else 0.0)
    check_mlp_forward(mlp, described, name)
    return described


def _dropout_rate(module: nn.Module, name: str) -> float:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return module.p
    raise ValueError(f'{name} is a {type(module).__name__}; expected nn.Dropout or Identity')


@torch.no_grad()
def check_mlp_forward(mlp: nn.Module, described: DenseFFN, name: str) -> None:
    """Refuse an MLP whose ``forward`` is not ``fc2(act(fc1(x)))`` (in eval mode).

    Its children alone do not say what its forward does with them (a skip connection, a
    scale); a few random tokens do.
    """
    fc1, fc2 = described.linears
    if fc1.weight.device.type == 'meta':
        return
    x = torch.randn(4, fc1.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(fc1.weight)
    training = mlp.training
    mlp.eval()
    try:
        got = mlp(x)
    finally:
        mlp.train(training)
    want = fc2(described.activation(fc1(x)))
    if not (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got, want, rtol=1e-4, atol=1e-5)):
        raise ValueError(f'{name} ({type(mlp).__name__}) has fc1, act and fc2, but its forward '
                         'is not fc2(act(fc1(x))); RMoE cannot take it over')
