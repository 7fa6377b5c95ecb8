"""CvT, the Convolutional vision Transformer (Wu et al. 2021), as an mmseg and mmdet backbone.

Three stages, each a convolutional token embedding followed by transformer blocks whose
queries, keys and values come from depth-wise convolutions (keys and values at stride 2), with
no position table, so any input size works. Module and parameter names are those of
microsoft/CvT (``lib/models/cls_cvt.py``), so its ImageNet checkpoints load as they are; the
computation follows it too, including the attention scale of ``dim ** -0.5`` over the whole
width (not the head width) and QuickGELU in the MLP.

Each block's ``mlp`` holds ``fc1``, ``act``, ``drop`` and ``fc2``: the FFN that an MoE
conversion replaces.
"""
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks.drop import DropPath
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmseg.registry import MODELS as MMSEG_MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine.checkpoint import extract_state_dict, load_checkpoint_file
from ..engine.convert import cvt_backbone_state_dict

HWShape = Tuple[int, int]

# Per-stage settings; the keys are the SPEC names of the official yaml files, in lower case.
ARCH_KEYS = ('dim_embed', 'depth', 'num_heads', 'patch_size', 'patch_stride', 'patch_padding',
             'mlp_ratio', 'qkv_bias', 'cls_token', 'kernel_qkv', 'padding_q', 'padding_kv',
             'stride_q', 'stride_kv')

_SHARED_SETTINGS = dict(patch_size=[7, 3, 3], patch_stride=[4, 2, 2], patch_padding=[2, 1, 1],
                        mlp_ratio=[4.0, 4.0, 4.0], qkv_bias=[True, True, True],
                        cls_token=[False, False, True], kernel_qkv=[3, 3, 3],
                        padding_q=[1, 1, 1], padding_kv=[1, 1, 1], stride_q=[1, 1, 1],
                        stride_kv=[2, 2, 2])

# experiments/imagenet/cvt/cvt-{13,21}-224x224.yaml and cvt-w24-384x384.yaml of microsoft/CvT.
ARCH_SETTINGS = {
    'cvt-13': dict(_SHARED_SETTINGS, dim_embed=[64, 192, 384], depth=[1, 2, 10],
                   num_heads=[1, 3, 6]),
    'cvt-21': dict(_SHARED_SETTINGS, dim_embed=[64, 192, 384], depth=[1, 4, 16],
                   num_heads=[1, 3, 6]),
    'cvt-w24': dict(_SHARED_SETTINGS, dim_embed=[192, 768, 1024], depth=[2, 2, 20],
                    num_heads=[3, 12, 16]),
}


def resolve_arch(arch: Union[str, dict]) -> Dict[str, list]:
    """The per-stage settings of ``arch``: a name of ``ARCH_SETTINGS`` or a dict of them.

    In a dict every key of ``ARCH_KEYS`` is required; a single value stands for every stage.
    The number of stages is the length of ``dim_embed``.

    Raises:
        ValueError: unknown name, missing or unknown keys, lists of the wrong length, or a
            width that the heads do not divide.
    """
    expected = (f"one of {sorted(ARCH_SETTINGS)} or a dict with the keys {list(ARCH_KEYS)} "
                '(per-stage lists)')
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'arch must be {expected}, got {arch!r}')
        arch = ARCH_SETTINGS[arch]
    if not isinstance(arch, dict):
        raise ValueError(f'arch must be {expected}, got {arch!r}')
    missing = [k for k in ARCH_KEYS if k not in arch]
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if missing or unknown:
        raise ValueError(f'arch must be {expected}; missing keys {missing}, '
                         f'unknown keys {unknown}')
    num_stages = len(arch['dim_embed'])
    settings = {}
    for key in ARCH_KEYS:
        value = arch[key]
        values = list(value) if isinstance(value, (list, tuple)) else [value] * num_stages
        if len(values) != num_stages:
            raise ValueError(f'arch[{key!r}] must give one value per stage ({num_stages} '
                             f'stages, from dim_embed), got {value!r}')
        settings[key] = values
    for dim, heads in zip(settings['dim_embed'], settings['num_heads']):
        if dim % heads:
            raise ValueError(f'arch: dim_embed {dim} is not divisible by num_heads {heads}')
    return settings


def stage_drop_path_rates(drop_path_rate: Union[float, Sequence[float]],
                          num_stages: int) -> List[float]:
    """Each stage's stochastic depth rate, reached by its last block.

    A single rate goes to the last stage only, the earlier stages get none, as in every
    official CvT recipe (``DROP_PATH_RATE: [0.0, 0.0, 0.1]``).
    """
    if isinstance(drop_path_rate, (int, float)):
        rates = [0.0] * (num_stages - 1) + [float(drop_path_rate)]
    else:
        rates = [float(r) for r in drop_path_rate]
    if len(rates) != num_stages or not all(0.0 <= r < 1.0 for r in rates):
        raise ValueError(f'drop_path_rate must be a rate in [0, 1) or one per stage '
                         f'({num_stages} stages), got {drop_path_rate!r}')
    return rates


def tokens_to_map(x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
    """(B, H*W, C) tokens as a (B, C, H, W) map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw_shape)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map as (B, H*W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation the official CvT was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvTokenEmbed(nn.Module):
    """Convolutional token embedding: an overlapping strided conv, then LayerNorm on tokens.

    Args:
        in_channels (int): Channels of the input map.
        embed_dims (int): Channels of the tokens.
        patch_size (int): Kernel size of the conv.
        stride (int): Stride of the conv.
        padding (int): Zero padding of the conv.
    """

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int, stride: int,
                 padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, patch_size, stride, padding)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, HWShape]:
        x = self.proj(x)
        return self.norm(map_to_tokens(x)), tuple(x.shape[2:])


class ConvProjection(nn.Module):
    """Depth-wise conv and BatchNorm over the token map (the official ``dw_bn`` method).

    Args:
        dims (int): Channels of the tokens.
        kernel_size (int): Kernel size of the depth-wise conv.
        stride (int): Its stride; 2 for keys and values subsamples them.
        padding (int): Its zero padding.
    """

    def __init__(self, dims: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(dims, dims, kernel_size, stride, padding, groups=dims,
                              bias=False)
        self.bn = nn.BatchNorm2d(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return map_to_tokens(self.bn(self.conv(x)))


class ConvAttention(nn.Module):
    """Multi-head attention over convolutional projections of the token map.

    The cls token, when there is one, bypasses the convolutions and joins queries, keys and
    values before their linear projections.

    Args:
        dims (int): Channels of the tokens.
        num_heads (int): Attention heads.
        qkv_bias (bool): Whether ``proj_q``, ``proj_k`` and ``proj_v`` have a bias.
        kernel_size (int): Kernel size of the depth-wise projections.
        stride_q (int): Stride of the query projection.
        stride_kv (int): Stride of the key and value projections.
        padding_q (int): Padding of the query projection.
        padding_kv (int): Padding of the key and value projections.
        with_cls_token (bool): Whether the first token is a cls token.
        attn_drop (float): Dropout rate on the attention weights.
        proj_drop (float): Dropout rate after the output projection.
    """

    def __init__(self, dims: int, num_heads: int, qkv_bias: bool, kernel_size: int,
                 stride_q: int, stride_kv: int, padding_q: int, padding_kv: int,
                 with_cls_token: bool, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.with_cls_token = with_cls_token
        # The official scale uses the whole width, not the head width; its weights expect it.
        self.scale = dims ** -0.5
        self.attn_drop = attn_drop
        self.conv_proj_q = ConvProjection(dims, kernel_size, stride_q, padding_q)
        self.conv_proj_k = ConvProjection(dims, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = ConvProjection(dims, kernel_size, stride_kv, padding_kv)
        self.proj_q = nn.Linear(dims, dims, bias=qkv_bias)
        self.proj_k = nn.Linear(dims, dims, bias=qkv_bias)
        self.proj_v = nn.Linear(dims, dims, bias=qkv_bias)
        self.proj = nn.Linear(dims, dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dims = x.shape
        return x.view(batch, tokens, self.num_heads, dims // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        cls_token = x[:, :1] if self.with_cls_token else None
        feature_map = tokens_to_map(x[:, 1:] if self.with_cls_token else x, hw_shape)
        qkv = [proj(feature_map) for proj in (self.conv_proj_q, self.conv_proj_k,
                                              self.conv_proj_v)]
        if cls_token is not None:
            qkv = [torch.cat((cls_token, t), dim=1) for t in qkv]
        q, k, v = (self.split_heads(linear(t))
                   for linear, t in zip((self.proj_q, self.proj_k, self.proj_v), qkv))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        out = out.transpose(1, 2).flatten(2)
        return self.proj_drop(self.proj(out))


class CvTMlp(nn.Module):
    """The feed-forward network of a block: ``fc1``, ``act``, ``drop``, ``fc2``, ``drop``.

    Args:
        dims (int): Input and output channels.
        hidden_dims (int): Hidden channels.
        drop (float): Dropout rate after the activation and after ``fc2``.
    """

    def __init__(self, dims: int, hidden_dims: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden_dims, dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class CvTBlock(nn.Module):
    """Pre-norm transformer block with convolutional attention.

    Args:
        dims (int): Channels of the tokens.
        num_heads (int): Attention heads.
        mlp_ratio (float): Hidden width of the MLP over ``dims``.
        attn_cfg (dict): Remaining ``ConvAttention`` arguments (projection kernel, strides,
            paddings, ``qkv_bias``, ``with_cls_token``).
        drop_rate (float): Dropout rate after the attention projection and in the MLP.
        attn_drop_rate (float): Dropout rate on the attention weights.
        drop_path_rate (float): Stochastic depth rate of both residual branches.
    """

    def __init__(self, dims: int, num_heads: int, mlp_ratio: float, attn_cfg: dict,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attn = ConvAttention(dims, num_heads, attn_drop=attn_drop_rate,
                                  proj_drop=drop_rate, **attn_cfg)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dims)
        self.mlp = CvTMlp(dims, int(dims * mlp_ratio), drop_rate)

    def forward(self, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@contextmanager
def batch_norm_stats_restored(module: nn.Module):
    """The running statistics of ``module``'s BatchNorm layers end as they were on entry.

    Wraps the recomputation of a checkpointed block: its BatchNorms counted this batch in the
    first forward already, and must not count it twice. (Normalising without running
    statistics instead would save other tensors for backward than the first forward did,
    which non-reentrant checkpointing refuses.)
    """
    saved = [(buffer, buffer.clone()) for m in module.modules() if isinstance(m, _BatchNorm)
             for buffer in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class CvTStage(nn.Module):
    """One stage: convolutional token embedding, optional cls token, transformer blocks.

    Args:
        in_channels (int): Channels of the input map.
        settings (dict): This stage's entry of every ``ARCH_KEYS`` setting.
        drop_rate (float): Dropout rate on the embedded tokens and inside the blocks.
        attn_drop_rate (float): Dropout rate on the attention weights.
        drop_path_rates (list[float]): Stochastic depth rate of each block.
        with_cp (bool): Checkpoint each block's activations (without re-entry; not under
            torch.compile). Default: False.
    """

    def __init__(self, in_channels: int, settings: dict, drop_rate: float,
                 attn_drop_rate: float, drop_path_rates: Sequence[float],
                 with_cp: bool = False):
        super().__init__()
        dims = settings['dim_embed']
        self.with_cp = with_cp
        self.patch_embed = ConvTokenEmbed(in_channels, dims, settings['patch_size'],
                                          settings['patch_stride'], settings['patch_padding'])
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, dims)) if settings['cls_token']
                          else None)
        self.pos_drop = nn.Dropout(drop_rate)
        attn_cfg = dict(qkv_bias=settings['qkv_bias'], kernel_size=settings['kernel_qkv'],
                        stride_q=settings['stride_q'], stride_kv=settings['stride_kv'],
                        padding_q=settings['padding_q'], padding_kv=settings['padding_kv'],
                        with_cls_token=settings['cls_token'])
        self.blocks = nn.ModuleList(
            CvTBlock(dims, settings['num_heads'], settings['mlp_ratio'], attn_cfg, drop_rate,
                     attn_drop_rate, rate) for rate in drop_path_rates)

    def run_block(self, block: CvTBlock, x: torch.Tensor, hw_shape: HWShape) -> torch.Tensor:
        # torch.compile's checkpoint operator takes neither a context_fn nor the side effects
        # of an RMoE layer: compiled, the blocks run unchecked, in the graph.
        if not (self.with_cp and x.requires_grad) or torch.compiler.is_compiling():
            return block(x, hw_shape)
        # Without re-entry, so that what a block keeps on the side (an MoE layer's balance
        # loss) stays in the autograd graph.
        return cp.checkpoint(block, x, hw_shape, use_reentrant=False,
                             context_fn=lambda: (nullcontext(), batch_norm_stats_restored(block)))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stage's output map (B, C, H, W) and its cls token (B, 1, C), or None."""
        x, hw_shape = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = self.run_block(block, x, hw_shape)
        cls_token = None
        if self.cls_token is not None:
            cls_token, x = x[:, :1], x[:, 1:]
        return tokens_to_map(x, hw_shape), cls_token


def _official_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, _BatchNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@MMSEG_MODELS.register_module(name='CvT')
@MMDET_MODELS.register_module(name='CvT')
class CvT(BaseModule):
    """CvT backbone: a tuple of NCHW maps, one per stage in ``out_indices``.

    Stage ``i`` is the official ``stage{i}``; with the official archs the maps have strides
    4, 8 and 16. The cls token of the last stage takes part in its attention, as in the
    official model, but is not part of the output.

    Args:
        arch (str | dict): ``'cvt-13'``, ``'cvt-21'`` or ``'cvt-w24'`` (the official ImageNet
            settings), or a dict with every key of ``ARCH_KEYS`` (the SPEC names of the
            official yaml files in lower case), each a per-stage list or one value for all
            stages. Default: 'cvt-13'.
        in_channels (int): Channels of the input image. Default: 3.
        out_indices (int | Sequence[int]): Stages whose output maps are returned.
            Default: (0, 1, 2).
        drop_rate (float): Dropout rate on tokens, after attention and in the MLPs.
            Default: 0.0.
        attn_drop_rate (float): Dropout rate on attention weights. Default: 0.0.
        drop_path_rate (float | Sequence[float]): Stochastic depth rate reached by the last
            block of a stage, rising linearly from 0 over its blocks. A single rate is the
            last stage's, the earlier stages get none, as in the official recipes (0.1 for
            CvT-13 and CvT-21, 0.3 for CvT-W24); a sequence gives one rate per stage.
            Default: 0.1.
        output_norm (bool): Add a LayerNorm (``norm{i}``) to each output stage; by default
            each output is exactly the official stage's output. Default: False.
        norm_eval (bool): Keep the BatchNorm layers in eval mode (frozen running statistics)
            while training. Default: False.
        frozen_stages (int): Stages ``0..frozen_stages`` are frozen (no gradient, eval mode);
            -1 freezes none. Default: -1.
        with_cp (bool): Checkpoint each block's activations, without re-entry, to save
            memory (not under torch.compile). Default: False.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads an
            official CvT ImageNet checkpoint (or an mmseg/mmdet one holding a CvT backbone);
            None initialises as the official code does. Default: None.
    """

    def __init__(self, arch: Union[str, dict] = 'cvt-13', in_channels: int = 3,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2), drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0,
                 drop_path_rate: Union[float, Sequence[float]] = 0.1,
                 output_norm: bool = False, norm_eval: bool = False, frozen_stages: int = -1,
                 with_cp: bool = False, init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        settings = resolve_arch(arch)
        self.num_stages = len(settings['dim_embed'])
        self.embed_dims = settings['dim_embed']
        self.out_indices = self._check_out_indices(out_indices)
        if not -1 <= frozen_stages < self.num_stages:
            raise ValueError(f'frozen_stages must be in -1..{self.num_stages - 1}, '
                             f'got {frozen_stages!r}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.output_norm = output_norm
        rates = stage_drop_path_rates(drop_path_rate, self.num_stages)
        for i in range(self.num_stages):
            stage_settings = {key: values[i] for key, values in settings.items()}
            depth = stage_settings['depth']
            self.add_module(f'stage{i}', CvTStage(
                in_channels, stage_settings, drop_rate, attn_drop_rate,
                torch.linspace(0, rates[i], depth).tolist(), with_cp))
            in_channels = stage_settings['dim_embed']
            if output_norm and i in self.out_indices:
                self.add_module(f'norm{i}', nn.LayerNorm(in_channels))
        self._freeze_stages()

    def _check_out_indices(self, out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
        indices = (out_indices, ) if isinstance(out_indices, int) else tuple(out_indices)
        if not indices or not all(isinstance(i, int) and 0 <= i < self.num_stages
                                  for i in indices):
            raise ValueError(f'out_indices must be stage indices in 0..{self.num_stages - 1}, '
                             f'got {out_indices!r}')
        return tuple(sorted(set(indices)))

    def stages(self) -> List[CvTStage]:
        return [getattr(self, f'stage{i}') for i in range(self.num_stages)]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        for i, stage in enumerate(self.stages()):
            x, _ = stage(x)
            if i in self.out_indices:
                outs.append(self._output(i, x))
        return tuple(outs)

    def _output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if not self.output_norm:
            return x
        norm = getattr(self, f'norm{index}')
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    def _freeze_stages(self) -> None:
        for i in range(self.frozen_stages + 1):
            frozen = [getattr(self, f'stage{i}')]
            if hasattr(self, f'norm{i}'):
                frozen.append(getattr(self, f'norm{i}'))
            for module in frozen:
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def train(self, mode: bool = True) -> 'CvT':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self) -> None:
        init_cfg = self.init_cfg
        if init_cfg is not None and not (isinstance(init_cfg, dict)
                                         and init_cfg.get('type') == 'Pretrained'):
            super().init_weights()
            return
        self.apply(_official_init)
        for stage in self.stages():
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)
        if init_cfg is not None:
            self.load_pretrained(init_cfg['checkpoint'])
        self._is_init = True

    def load_pretrained(self, path: str) -> None:
        """Load a CvT checkpoint, logging by name what it lacks and what it has extra.

        Raises:
            ValueError: a tensor's shape differs from this backbone's (another arch).
        """
        state_dict = cvt_backbone_state_dict(extract_state_dict(load_checkpoint_file(path)))
        own = self.state_dict()
        mismatched = [f'{k}: {tuple(v.shape)} in checkpoint, {tuple(own[k].shape)} here'
                      for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
        if mismatched:
            raise ValueError(f'checkpoint {path!r} does not fit this CvT (another arch?): '
                             f'{mismatched}')
        result = self.load_state_dict(state_dict, strict=False)
        logger = MMLogger.get_current_instance()
        logger.info(f'CvT: loaded {len(state_dict) - len(result.unexpected_keys)} tensors '
                    f'from {path}')
        # What a dense checkpoint cannot hold, the routers and residuals of RMoE layers, the
        # RMoE backbone reports itself.
        missing = sorted(k for k in result.missing_keys
                         if '.moe.router.' not in k and '.moe.experts.residual_' not in k)
        if missing:
            logger.warning(f'CvT: missing in checkpoint (kept their initialisation): {missing}')
        if result.unexpected_keys:
            logger.warning(f'CvT: unexpected in checkpoint (ignored): '
                           f'{sorted(result.unexpected_keys)}')
