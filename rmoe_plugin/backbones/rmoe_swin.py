"""``RMoESwinTransformer``: the upstream Swin with some FFNs replaced by ``RMoEFFN``.

Two registered classes share one name: in the mmseg registry it extends mmseg's Swin, in the
mmdet registry mmdet's, so a config built in either scope gets its framework's own Swin with
every argument it takes, plus ``moe_cfg`` and ``moe_blocks``.
"""
import uuid
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Union

import torch.utils.checkpoint as cp
from mmdet.models.backbones.swin import SwinBlock as MMDetSwinBlock
from mmdet.models.backbones.swin import SwinTransformer as MMDetSwin
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from mmengine.runner import CheckpointLoader
from mmseg.models.backbones.swin import SwinBlock as MMSegSwinBlock
from mmseg.models.backbones.swin import SwinTransformer as MMSegSwin
from mmseg.registry import MODELS as MMSEG_MODELS

from ..engine.checkpoint import extract_state_dict, load_checkpoint_file
from ..engine.convert import dense_ffn_to_core, to_openmmlab_swin
from ..models.ffn import RMoEFFN

MoEBlocks = Union[None, str, Sequence[Sequence[int]]]

_IN_MEMORY: Dict[str, dict] = {}


@CheckpointLoader.register_scheme(prefixes='rmoe://')
def _load_in_memory(filename, map_location=None):
    return _IN_MEMORY[filename]


@contextmanager
def in_memory_checkpoint(checkpoint: dict):
    """A URI that mmengine's ``CheckpointLoader`` resolves to ``checkpoint`` while open.

    Lets the upstream ``init_weights`` (prefix stripping, position-table interpolation) run on
    a checkpoint we normalised, without writing a copy of it to disk.
    """
    uri = f'rmoe://{uuid.uuid4().hex}'
    _IN_MEMORY[uri] = checkpoint
    try:
        yield uri
    finally:
        del _IN_MEMORY[uri]


def resolve_moe_blocks(moe_blocks: MoEBlocks, depths: Sequence[int]) -> List[List[int]]:
    """Which blocks of each stage become MoE.

    Args:
        moe_blocks: None for the default (every other block, the odd ones, of the last two
            stages, as Swin-MoE does); ``'all'``; ``'none'``; or one list of block indices per
            stage, e.g. ``[[], [], [1, 3, 5], [1]]``.
        depths: blocks per stage.
    """
    if moe_blocks is None:
        return [list(range(1, d, 2)) if s >= len(depths) - 2 else []
                for s, d in enumerate(depths)]
    if moe_blocks == 'all':
        return [list(range(d)) for d in depths]
    if moe_blocks == 'none':
        return [[] for _ in depths]
    if isinstance(moe_blocks, str) or len(moe_blocks) != len(depths):
        raise ValueError(f"moe_blocks must be None, 'all', 'none' or one list of block indices "
                         f'per stage ({len(depths)} stages), got {moe_blocks!r}')
    for stage, (blocks, depth) in enumerate(zip(moe_blocks, depths)):
        bad = [b for b in blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(f'moe_blocks: stage {stage} has blocks 0..{depth - 1}, got {bad}')
    return [sorted(set(blocks)) for blocks in moe_blocks]


def _moe_block_forward(self, x, hw_shape):
    """The upstream ``SwinBlock.forward``, checkpointed without re-entry.

    The re-entrant checkpoint runs its first forward without grad, which would leave the
    balance losses (kept on the side by the MoE layer) without a gradient.
    """

    def inner_forward(x):
        identity = x
        x = self.norm1(x)
        x = self.attn(x, hw_shape) + identity
        return self.ffn(self.norm2(x), identity=x)

    if self.with_cp and x.requires_grad:
        return cp.checkpoint(inner_forward, x, use_reentrant=False)
    return inner_forward(x)


class RMoESwinBlock(MMSegSwinBlock):
    """mmseg's SwinBlock holding an ``RMoEFFN``; only ``forward`` differs."""
    forward = _moe_block_forward


class RMoESwinBlockDet(MMDetSwinBlock):
    """mmdet's SwinBlock holding an ``RMoEFFN``; only ``forward`` differs."""
    forward = _moe_block_forward


class RMoESwinMixin:
    """Turns chosen FFNs of an upstream Swin into ``RMoEFFN`` and loads dense checkpoints."""
    moe_block_class: type

    def _build_moe(self, moe_cfg: Optional[dict], moe_blocks: MoEBlocks) -> None:
        depths = [len(stage.blocks) for stage in self.stages]
        self.moe_blocks = resolve_moe_blocks(moe_blocks, depths)
        moe_cfg = dict(moe_cfg or {})
        for stage, blocks in zip(self.stages, self.moe_blocks):
            for b in blocks:
                block = stage.blocks[b]
                block.ffn = RMoEFFN.from_dense(block.ffn, **moe_cfg)
                block.__class__ = self.moe_block_class

    def moe_layers(self) -> List[RMoEFFN]:
        return [m for m in self.modules() if isinstance(m, RMoEFFN)]

    def init_weights(self) -> None:
        if self.init_cfg is None or self.init_cfg.get('type') != 'Pretrained':
            super().init_weights()
            for layer in self.moe_layers():  # the upstream init only touches nn.Linear
                layer.moe.experts.reset_parameters()
                layer.moe.router.reset_parameters()
            return
        path = self.init_cfg['checkpoint']
        state_dict, layout = to_openmmlab_swin(extract_state_dict(load_checkpoint_file(path)))
        original_cfg = self.init_cfg
        convert = getattr(self, 'convert_weights', None)
        # Both upstream loaders strip 'backbone.'; mmdet's keeps nothing else.
        prefixed = {f'backbone.{k}': v for k, v in state_dict.items()}
        with in_memory_checkpoint({'state_dict': prefixed}) as uri:
            self.init_cfg = ConfigDict(dict(original_cfg, checkpoint=uri))
            if convert is not None:
                self.convert_weights = False  # already in the upstream layout
            try:
                super().init_weights()
            finally:
                self.init_cfg = original_cfg
                if convert is not None:
                    self.convert_weights = convert
        self._report_loaded(path, layout, state_dict)

    def _report_loaded(self, path: str, layout: str, state_dict: dict) -> None:
        own = set(self.state_dict())
        given = dict(state_dict)
        for name, layer in self.named_modules():
            if isinstance(layer, RMoEFFN):
                dense_ffn_to_core(given, name + '.', layer.num_fcs)
        fresh = sorted(own - set(given))
        moe_fresh = [k for k in fresh if '.moe.router.' in k or '.moe.experts.residual_' in k]
        missing = [k for k in fresh if k not in moe_fresh]
        unexpected = sorted(k for k in set(given) - own if not k.endswith('attn_mask'))
        logger = MMLogger.get_current_instance()
        logger.info(f'{type(self).__name__}: loaded a Swin checkpoint ({layout} layout) from '
                    f'{path} into {len(self.moe_layers())} RMoE layers; '
                    + (f'dense FFNs became their cores, routers and residuals '
                       f'({len(moe_fresh)} tensors) start fresh' if moe_fresh
                       else 'their experts and routers came from the checkpoint'))
        if missing:
            logger.warning(f'missing in checkpoint (kept their initialisation): {missing}')
        if unexpected:
            logger.warning(f'unexpected in checkpoint (ignored): {unexpected}')


_MOE_DOC = """
    RMoE arguments (all others are the upstream Swin's):
        moe_cfg (dict, optional): ``RMoEFFN`` arguments for every MoE block, e.g.
            ``dict(num_experts=8, top_k=1, capacity_factor=1.25)``.
        moe_blocks (None | str | list[list[int]]): blocks that become MoE; None: every other
            block of the last two stages; ``'all'``; ``'none'``; or indices per stage.
"""


@MMSEG_MODELS.register_module(name='RMoESwinTransformer')
class RMoESwinTransformer(RMoESwinMixin, MMSegSwin):
    __doc__ = 'mmseg Swin Transformer with residual-MoE FFNs.\n' + _MOE_DOC
    moe_block_class = RMoESwinBlock

    def __init__(self, *args, moe_cfg: Optional[dict] = None, moe_blocks: MoEBlocks = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._build_moe(moe_cfg, moe_blocks)


@MMDET_MODELS.register_module(name='RMoESwinTransformer')
class RMoESwinTransformerDet(RMoESwinMixin, MMDetSwin):
    __doc__ = 'mmdet Swin Transformer with residual-MoE FFNs.\n' + _MOE_DOC
    moe_block_class = RMoESwinBlockDet

    def __init__(self, *args, moe_cfg: Optional[dict] = None, moe_blocks: MoEBlocks = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._build_moe(moe_cfg, moe_blocks)
