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

from ..engine.convert import dense_ffn_to_core
from ..moe import MoEFeedForward


@MODELS.register_module()
class RMoEFFN(BaseModule):
    """Residual mixture-of-experts FFN with mmcv ``FFN``'s arguments and ``forward``.

    Every expert is the shared core (a dense FFN's weights) plus its own residual. The first
    nine arguments are mmcv ``FFN``'s and mean the same; the rest configure the experts, the
    router and the balance losses (see :class:`rmoe_plugin.moe.MoEFeedForward`). Registered in
    mmengine's root ``MODELS``, so configs built in the mmseg and mmdet scopes find it.

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

    def forward(self, x: torch.Tensor, identity: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.gamma2(self.moe(x))
        if not self.add_identity:
            return self.dropout_layer(out)
        if identity is None:
            identity = x
        return identity + self.dropout_layer(out)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dense FFN's weights, wherever they come from (a dense checkpoint through
        # ``init_cfg``, ``load_from``, ``load_state_dict``), become the experts' core.
        dense_ffn_to_core(state_dict, prefix, self.num_fcs)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @classmethod
    def from_dense(cls, ffn: FFN, **moe_args) -> 'RMoEFFN':
        """Build an RMoE layer whose core is ``ffn``'s weights, on ``ffn``'s device and dtype.

        With ``top_k=1``, the straight-through gate, no router noise and zero residual noise,
        the new layer returns exactly what ``ffn`` returns for every token not dropped (all of
        them in dropless mode). Activation, dropouts, identity and LayerScale are ``ffn``'s.

        Raises:
            ValueError: ``moe_args`` name widths other than ``ffn``'s, or ``ffn`` is no FFN.
        """
        if not isinstance(ffn, FFN):
            raise ValueError(f'from_dense expects an mmcv FFN, got {type(ffn).__name__}')
        widths = dict(embed_dims=ffn.embed_dims, feedforward_channels=ffn.feedforward_channels,
                      num_fcs=ffn.num_fcs)
        for name, value in widths.items():
            if moe_args.pop(name, value) != value:
                raise ValueError(f'{name}={value!r} of the dense FFN does not match the '
                                 f'requested value')
        hidden = list(ffn.layers[:-2])  # (Linear, activation, Dropout) each
        last = ffn.layers[-2]
        layer = cls(**widths, ffn_drop=hidden[0][2].p, add_identity=ffn.add_identity,
                    **moe_args)
        activation = hidden[0][1]
        layer.moe.experts.activations = nn.ModuleList(
            copy.deepcopy(activation) for _ in hidden)
        layer.dropout_layer = copy.deepcopy(ffn.dropout_layer)
        layer.gamma2 = copy.deepcopy(ffn.gamma2)
        layer.moe.experts.load_core([h[0].weight for h in hidden] + [last.weight],
                                    [h[0].bias for h in hidden] + [last.bias])
        return layer.to(device=last.weight.device, dtype=last.weight.dtype)

    def to_dense(self) -> FFN:
        """A dense mmcv ``FFN`` holding the mean expert (core + mean residual)."""
        ffn = FFN(self.embed_dims, self.feedforward_channels, self.num_fcs,
                  ffn_drop=self.moe.experts.dropout.p, add_identity=self.add_identity)
        linears = [s[0] for s in ffn.layers[:-2]] + [ffn.layers[-2]]
        for i, act in enumerate(self.moe.experts.activations):
            ffn.layers[i][1] = copy.deepcopy(act)
        ffn.dropout_layer = copy.deepcopy(self.dropout_layer)
        ffn.gamma2 = copy.deepcopy(self.gamma2)
        weights, biases = self.moe.experts.mean_expert()
        with torch.no_grad():
            for linear, w, b in zip(linears, weights, biases):
                linear.weight.copy_(w)
                linear.bias.copy_(b)
        return ffn.to(device=weights[0].device, dtype=weights[0].dtype)
