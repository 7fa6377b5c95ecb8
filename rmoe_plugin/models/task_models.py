"""Segmentors, detectors and a classifier whose loss dict carries the MoE balance losses.

``rmoe_model(cls)`` subclasses any mmseg segmentor or mmdet detector: its ``loss`` returns the
upstream task losses plus :func:`collect_moe_losses`. Nothing else changes: checkpoint keys,
``data_preprocessor``, ``predict`` and every tool are the upstream class's. Registering one
more model is one line: ``MODELS.register_module(module=rmoe_model(SomeDetector))``.
"""
from typing import Dict, Type

import torch
from mmdet.models.detectors import CascadeRCNN, MaskRCNN
from mmdet.registry import MODELS as MMDET_MODELS
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS as MMSEG_MODELS

from ..moe import collect_moe_losses


def rmoe_model(base: Type) -> Type:
    """A subclass of ``base`` named ``RMoE<base>`` that adds ``loss_moe_*`` to its losses."""

    def loss(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        losses = base.loss(self, *args, **kwargs)
        losses.update(collect_moe_losses(self))
        return losses

    return type(f'RMoE{base.__name__}', (base,), dict(
        loss=loss, __module__=__name__,
        __doc__=f'``{base.__name__}`` whose loss dict also holds the MoE balance losses.'))


RMoEEncoderDecoder = MMSEG_MODELS.register_module(module=rmoe_model(EncoderDecoder))
RMoEMaskRCNN = MMDET_MODELS.register_module(module=rmoe_model(MaskRCNN))
RMoECascadeRCNN = MMDET_MODELS.register_module(module=rmoe_model(CascadeRCNN))

try:  # mmpretrain is optional: it runs the upstream (classification) stages
    from mmpretrain.models import ImageClassifier
    from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS
except ImportError:
    RMoEImageClassifier = None
else:
    RMoEImageClassifier = MMPRETRAIN_MODELS.register_module(module=rmoe_model(ImageClassifier))
