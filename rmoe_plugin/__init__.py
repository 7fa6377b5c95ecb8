"""Residual Mixture of Experts for OpenMMLab.

Importing this package (``custom_imports=dict(imports=['rmoe_plugin'])`` in a config)
registers its modules where configs built in the mmseg and mmdet scopes find them, and lets
mmengine's own checkpoints load under torch's ``weights_only`` default.
"""
from .backbones import RMoESwinTransformer, RMoESwinTransformerDet
from .engine import MoEStatsHook, allow_mmengine_checkpoints
from .models import RMoECascadeRCNN, RMoEEncoderDecoder, RMoEFFN, RMoEMaskRCNN, rmoe_model
from .moe import MoEFeedForward, collect_moe_losses
from .pipeline import CostHook

__version__ = '0.1.0'
__all__ = [
    'CostHook', 'MoEFeedForward', 'MoEStatsHook', 'RMoECascadeRCNN', 'RMoEEncoderDecoder',
    'RMoEFFN', 'RMoEMaskRCNN', 'RMoESwinTransformer', 'RMoESwinTransformerDet',
    'collect_moe_losses', 'rmoe_model'
]

allow_mmengine_checkpoints()
