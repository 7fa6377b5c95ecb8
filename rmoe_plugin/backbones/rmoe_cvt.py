"""``RMoECvT``: the CvT backbone with some of its MLPs replaced by ``RMoEFFN``.

The conversion is the shared one of :mod:`.moe_conversion`; CvT's ``with_cp`` already
checkpoints without re-entry, so the balance loss keeps its gradient.
"""
from mmdet.registry import MODELS as MMDET_MODELS
from mmseg.registry import MODELS as MMSEG_MODELS

from .cvt import CvT
from .moe_conversion import RMoEBackboneMixin


@MMSEG_MODELS.register_module(name='RMoECvT')
@MMDET_MODELS.register_module(name='RMoECvT')
class RMoECvT(RMoEBackboneMixin, CvT):
    __doc__ = ("CvT with residual-MoE MLPs; every argument is CvT's, plus:\n"
               + (RMoEBackboneMixin.__doc__ or ''))
    checkpoints_without_reentry = True
