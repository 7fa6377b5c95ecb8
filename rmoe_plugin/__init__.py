"""Residual Mixture of Experts for OpenMMLab.

Importing this package (``custom_imports=dict(imports=['rmoe_plugin'])`` in a config)
registers its modules where configs built in the mmseg and mmdet scopes find them, and lets
mmengine's own checkpoints load under torch's ``weights_only`` default. ``rmoe_plugin.moe``,
the layer itself, needs nothing but PyTorch (see :mod:`rmoe_plugin.registration`).
"""
import importlib

from .moe import MoEFeedForward, collect_moe_losses
from .registration import register_all_modules, register_when_mmengine_loads

__version__ = '0.1.0'

# What lives in the OpenMMLab glue, loaded on first access.
_OPENMMLAB_EXPORTS = {
    'CostHook': 'pipeline', 'CvT': 'backbones', 'MoEStatsHook': 'engine',
    'RMoECascadeRCNN': 'models', 'RMoECvT': 'backbones',
    'RMoEDistributedDataParallel': 'engine',
    'RMoEEncoderDecoder': 'models', 'RMoEFFN': 'models', 'RMoEMaskRCNN': 'models',
    'RMoESwinTransformer': 'backbones', 'RMoESwinTransformerDet': 'backbones',
    'allow_mmengine_checkpoints': 'engine', 'rmoe_model': 'models',
}
__all__ = ['MoEFeedForward', 'collect_moe_losses', 'register_all_modules',
           *sorted(_OPENMMLAB_EXPORTS)]


def __getattr__(name):
    if name not in _OPENMMLAB_EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    register_all_modules()
    return getattr(importlib.import_module(f'.{_OPENMMLAB_EXPORTS[name]}', __name__), name)


register_when_mmengine_loads()
