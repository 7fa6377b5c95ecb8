"""``RMoESwinTransformer``: the upstream Swin with some FFNs replaced by ``RMoEFFN``.

Two registered classes share one name: in the mmseg registry it extends mmseg's Swin, in the
mmdet registry mmdet's, so a config built in either scope gets its framework's own Swin with
every argument it takes, plus ``moe_cfg`` and ``moe_blocks``. The conversion (checkpointing
MoE blocks without re-entry included) is the shared one of :mod:`.moe_conversion`; what is
Swin's own here is loading dense Swin checkpoints in the official and timm layouts and
Swin-MoE's (released or converted by ``tools/convert_swin_moe.py``).
"""
import uuid
from contextlib import contextmanager
from typing import Dict

from mmdet.models.backbones.swin import SwinTransformer as MMDetSwin
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger
from mmengine.runner import CheckpointLoader
from mmseg.models.backbones.swin import SwinTransformer as MMSegSwin
from mmseg.registry import MODELS as MMSEG_MODELS

from ..engine.convert import dense_ffn_to_core, is_swin_derived_buffer, to_openmmlab_swin
from ..engine.swin_moe import check_fits, describe, load_swin_checkpoint
from .moe_conversion import RMoEBackboneMixin

_IN_MEMORY: Dict[str, dict] = {}


@CheckpointLoader.register_scheme(prefixes='rmoe://')
def load_from_memory(filename, map_location=None):  # mmengine logs 'by memory backend'
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


class RMoESwinMixin(RMoEBackboneMixin):
    """The shared RMoE conversion on an upstream Swin (its MoE blocks checkpoint without
    re-entry, as every RMoE backbone's), which loads dense Swin checkpoints in any known
    layout."""

    def init_weights(self) -> None:
        if self.init_cfg is None or self.init_cfg.get('type') != 'Pretrained':
            super().init_weights()
            return
        path = self.init_cfg['checkpoint']
        window = self.stages[0].blocks[0].attn.w_msa.window_size[0]
        state_dict, swin_moe = load_swin_checkpoint(path, window)
        if swin_moe is None:
            state_dict, layout = to_openmmlab_swin(state_dict)
        else:
            self._check_swin_moe(path, state_dict, swin_moe)
            layout = 'Swin-MoE'
        given = set(state_dict)
        # What timm never stores, the upstream Swin derives: hand it its own values, so that
        # neither loader reports them missing.
        state_dict.update((k, v) for k, v in self.state_dict().items()
                          if is_swin_derived_buffer(k) and k not in state_dict)
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
        if swin_moe is None:
            self._report_keys(path, layout, {k: state_dict[k] for k in given})
        else:
            MMLogger.get_current_instance().info(
                f'{type(self).__name__}: loaded a Swin-MoE checkpoint from {path}: '
                + '; '.join(describe(swin_moe)))

    def _check_swin_moe(self, path: str, state_dict: dict, swin_moe: dict) -> None:
        """Refuse a Swin-MoE checkpoint that does not fit this backbone exactly: all of it
        is the model (the out norms aside, which Swin-MoE lacks)."""
        own = {k: v.shape for k, v in self.state_dict().items()}
        problems = check_fits(state_dict, swin_moe, own)
        if problems:
            more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
            raise ValueError(f'Swin-MoE checkpoint {path} does not fit {type(self).__name__}: '
                             + '; '.join(problems[:3]) + more)

    def _report_keys(self, path: str, layout: str, state_dict: dict) -> None:
        own = set(self.state_dict())
        given = dict(state_dict)
        for name, layer in zip(self.moe_layer_names, self.moe_layers()):
            dense_ffn_to_core(given, name + '.', layer.dense_linear_names)
        fresh = own - set(given)
        missing = sorted(k for k in fresh if not is_swin_derived_buffer(k)
                         and '.moe.router.' not in k and '.moe.experts.residual_' not in k)
        unexpected = sorted(k for k in set(given) - own if not is_swin_derived_buffer(k))
        logger, backbone = MMLogger.get_current_instance(), type(self).__name__
        logger.info(f'{backbone}: loaded a Swin checkpoint ({layout} layout) from {path}')
        if missing:
            logger.warning(f'{backbone}: missing in checkpoint (kept their initialisation): '
                           f'{missing}')
        if unexpected:
            logger.warning(f'{backbone}: unexpected in checkpoint (ignored): {unexpected}')


@MMSEG_MODELS.register_module(name='RMoESwinTransformer')
class RMoESwinTransformer(RMoESwinMixin, MMSegSwin):
    __doc__ = ('mmseg Swin Transformer with residual-MoE FFNs; every argument is the upstream '
               "Swin's, plus:\n" + (RMoEBackboneMixin.__doc__ or ''))


@MMDET_MODELS.register_module(name='RMoESwinTransformer')
class RMoESwinTransformerDet(RMoESwinMixin, MMDetSwin):
    __doc__ = ('mmdet Swin Transformer with residual-MoE FFNs; every argument is the upstream '
               "Swin's, plus:\n" + (RMoEBackboneMixin.__doc__ or ''))
