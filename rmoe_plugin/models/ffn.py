"""``RMoEFFN``: the residual-MoE layer as a drop-in for mmcv's ``FFN``."""
import copy
from typing import Optional

import torch
from mmcv.cnn import build_activation_layer
from mmcv.cnn.bricks.drop import build_dropout
from mmcv.cnn.bricks.scale import LayerScale
from mmcv.cnn.bricks.transformer import FFN
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import nn

from ..engine.convert import (core_keys, dense_ffn_to_core, mmcv_ffn_linear_names,
                              moe_experts_to_core)
from ..moe import MoEFeedForward
from .dense_ffn import DenseFFN, describe_dense_ffn

# from_dense: arguments that carry no weights replace the dense FFN's; the widths must be the
# dense FFN's; the activation and LayerScale are the dense FFN's, so giving them is refused.
OVERRIDABLE_FFN_ARGS = ('ffn_drop', 'dropout_layer', 'add_identity', 'init_cfg')
DENSE_BOUND_FFN_ARGS = ('act_cfg', 'layer_scale_init_value')


@MODELS.register_module()
class RMoEFFN(BaseModule):
    """Residual mixture-of-experts FFN with mmcv ``FFN``'s arguments and ``forward``.

    Every expert is the shared core (a dense FFN's weights) plus its own residual. The first
    nine arguments are mmcv ``FFN``'s and mean the same; the rest configure the experts, the
    router and the balance losses (see :class:`rmoe_plugin.moe.MoEFeedForward`). The weights
    of a dense mmcv ``FFN`` (or, after :meth:`from_dense`, of the FFN it replaced) load into
    the core; the stacked experts of an MoE checkpoint (``moe.experts.weights.{i}`` (E, out,
    in) and ``moe.experts.biases.{i}``, as a converted Swin-MoE holds them) load as the core,
    their mean, and the residuals, each expert minus it. Registered in mmengine's root
    ``MODELS``, so configs built in the mmseg and mmdet scopes find it.

    Args:
        embed_dims (int): token width. Default: 256.
        feedforward_channels (int): hidden width of each expert. Default: 1024.
        num_fcs (int): projections per expert, >= 2. Default: 2.
        act_cfg (dict): activation config. Default: ``dict(type='ReLU', inplace=True)``.
        ffn_drop (float): dropout inside the experts. Default: 0.
        dropout_layer (dict, optional): dropout (e.g. DropPath) before the identity add.
        add_identity (bool): add the identity (``x`` unless given) to the output. Default: True.
        init_cfg (dict, optional): mmengine initialisation config.
        layer_scale_init_value (float): LayerScale init; 0 disables it. Default: 0.
        num_experts (int): E. Default: 8.
        top_k (int): experts per token. Default: 1.
        capacity_factor (float | None): training capacity factor; None is dropless. Default: 1.25.
        eval_capacity_factor (float | None): evaluation capacity factor; None is dropless.
            Default: None.
        batch_prioritized (bool): batch-prioritised slot assignment. Default: True.
        router_noise_std (float): training noise std on the router logits. Default: 0.
        straight_through (bool): unscaled forward value, gated gradients. Default: True.
        normalize_gates (bool): renormalise top-k gates (k > 1, not straight-through).
            Default: True.
        residual_init_std (float): initial noise of the residuals. Default: 0.
        freeze_core (bool): train only the residuals. Default: False.
        importance_loss_weight (float): importance CV^2 weight. Default: 0.01.
        balance_loss_weight (float): Switch load-balancing loss weight. Default: 0.
        z_loss_weight (float): router z-loss weight. Default: 0.
        router_type (str): ``'linear'`` or ``'cosine'`` (Swin-MoE's cosine router).
            Default: 'linear'.
        cosine_router_dims (int): projection width of the cosine router. Default: 256.
        cosine_router_init_temperature (float): its initial temperature. Default: 0.5.
        gate_noise (float): Tutel's training noise on the router logits, std
            ``gate_noise / num_experts``. Default: 0.
    """

    def __init__(self,
                 embed_dims: int = 256,
                 feedforward_channels: int = 1024,
                 num_fcs: int = 2,
                 act_cfg: dict = dict(type='ReLU', inplace=True),
                 ffn_drop: float = 0.,
                 dropout_layer: Optional[dict] = None,
                 add_identity: bool = True,
                 init_cfg: Optional[dict] = None,
                 layer_scale_init_value: float = 0.,
                 **moe_args):
        super().__init__(init_cfg)
        self.embed_dims = embed_dims
        self.feedforward_channels = feedforward_channels
        self.num_fcs = num_fcs
        self.moe = MoEFeedForward(
            embed_dims, feedforward_channels, num_fcs=num_fcs,
            activation=lambda: build_activation_layer(act_cfg), dropout=ffn_drop, **moe_args)
        self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()
        self.add_identity = add_identity
        self.gamma2 = (LayerScale(embed_dims, scale=layer_scale_init_value)
                       if layer_scale_init_value > 0 else nn.Identity())
        # The names of the dense projections this layer takes the place of: dense checkpoints
        # load into the core through them, and convert_rmoe_to_dense writes them back.
        self.dense_linear_names = mmcv_ffn_linear_names(num_fcs)
        self.loaded_from: Optional[str] = None  # 'dense', 'moe' or 'rmoe', by the last load
        # A weightless copy of a non-mmcv dense FFN, for to_dense(); outside _modules, so it
        # is in no state dict and never moves.
        object.__setattr__(self, 'dense_template', None)

    def forward(self, x: torch.Tensor, identity: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.gamma2(self.moe(x))
        if not self.add_identity:
            return self.dropout_layer(out)
        if identity is None:
            identity = x
        return identity + self.dropout_layer(out)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dense FFN's weights, wherever they come from (a dense checkpoint through
        # ``init_cfg``, ``load_from``, ``load_state_dict``), become the experts' core; an MoE
        # checkpoint's experts become the core (their mean) and the residuals.
        if dense_ffn_to_core(state_dict, prefix, self.dense_linear_names):
            self.loaded_from = 'dense'
        elif moe_experts_to_core(state_dict, prefix, self.num_fcs):
            self.loaded_from = 'moe'
        elif core_keys(prefix, self.num_fcs)[0][0] in state_dict:
            self.loaded_from = 'rmoe'
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @classmethod
    def from_dense(cls, ffn: nn.Module, name: str = 'ffn', **args) -> 'RMoEFFN':
        """Build an RMoE layer whose core is ``ffn``'s weights, on ``ffn``'s device and dtype.

        ``ffn`` is an mmcv ``FFN`` or an ``fc1``/``act``/``fc2`` MLP (timm's ``Mlp``, CvT's);
        the new layer is called as ``ffn`` was. With ``top_k=1``, the straight-through gate,
        no router noise and zero residual noise, it returns exactly what ``ffn`` returns for
        every token not dropped (all of them in dropless mode). Activation, dropouts,
        identity and LayerScale are ``ffn``'s.

        Args:
            ffn (nn.Module): the dense FFN.
            name (str): its module path, for error messages. Default: 'ffn'.
            **args: ``RMoEFFN`` arguments. ``ffn_drop``, ``dropout_layer``, ``add_identity``
                and ``init_cfg`` replace ``ffn``'s; ``embed_dims``, ``feedforward_channels``
                and ``num_fcs`` must be ``ffn``'s; ``act_cfg`` and
                ``layer_scale_init_value`` are refused (``ffn``'s own are kept); the rest
                configure the experts and the router.

        Raises:
            ValueError: ``ffn`` is no FFN RMoE can take over, or an argument contradicts it.
        """
        dense = describe_dense_ffn(ffn, name)
        args = _check_ffn_args(dense, args)
        keep_dropout_layer = 'dropout_layer' not in args
        layer = cls(embed_dims=dense.embed_dims,
                    feedforward_channels=dense.feedforward_channels, num_fcs=dense.num_fcs,
                    ffn_drop=args.pop('ffn_drop', dense.dropout),
                    add_identity=args.pop('add_identity', dense.add_identity),
                    **args)
        layer.moe.experts.activations = nn.ModuleList(
            copy.deepcopy(dense.activation) for _ in dense.linears[:-1])
        if keep_dropout_layer and dense.dropout_layer is not None:
            layer.dropout_layer = copy.deepcopy(dense.dropout_layer)
        if dense.layer_scale is not None:
            layer.gamma2 = copy.deepcopy(dense.layer_scale)
        layer.moe.experts.load_core([lin.weight for lin in dense.linears],
                                    [lin.bias for lin in dense.linears])
        layer.dense_linear_names = list(dense.linear_names)
        if not dense.is_mmcv:
            object.__setattr__(layer, 'dense_template', copy.deepcopy(ffn).to('meta'))
        weight = dense.linears[-1].weight
        return layer.to(device=weight.device, dtype=weight.dtype)

    def to_dense(self) -> nn.Module:
        """A dense FFN of the form this layer replaced, holding the mean expert
        (core + mean residual): an mmcv ``FFN``, or a copy of the MLP given to
        :meth:`from_dense`."""
        weights, biases = self.moe.experts.mean_expert()
        if self.dense_template is not None:
            dense = copy.deepcopy(self.dense_template).to_empty(device=weights[0].device)
            linears = [dense.get_submodule(n) for n in self.dense_linear_names]
        else:
            dense = FFN(self.embed_dims, self.feedforward_channels, self.num_fcs,
                        ffn_drop=self.moe.experts.dropout.p, add_identity=self.add_identity)
            linears = [s[0] for s in dense.layers[:-2]] + [dense.layers[-2]]
            for i, act in enumerate(self.moe.experts.activations):
                dense.layers[i][1] = copy.deepcopy(act)
            dense.dropout_layer = copy.deepcopy(self.dropout_layer)
            dense.gamma2 = copy.deepcopy(self.gamma2)
        with torch.no_grad():
            for linear, w, b in zip(linears, weights, biases):
                linear.weight.copy_(w)
                linear.bias.copy_(b)
        return dense.to(device=weights[0].device, dtype=weights[0].dtype)


def _check_ffn_args(dense: DenseFFN, args: dict) -> dict:
    """``args`` without the widths, once they agree with ``dense`` (see from_dense)."""
    args = dict(args)
    for name in ('embed_dims', 'feedforward_channels', 'num_fcs'):
        if name in args and args.pop(name) != getattr(dense, name):
            raise ValueError(f'{name}={getattr(dense, name)!r} of the dense FFN does not match '
                             'the requested value; the core needs the dense widths')
    refused = [name for name in DENSE_BOUND_FFN_ARGS if name in args]
    if refused:
        raise ValueError(f'from_dense keeps the dense FFN\'s activation and LayerScale; '
                         f'remove {refused} (the arguments it takes over are '
                         f'{list(OVERRIDABLE_FFN_ARGS)})')
    return args
