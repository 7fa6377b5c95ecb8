from .cvt import CvT
from .moe_conversion import (FFNSite, RMoEBackboneMixin, convert_ffns, find_ffns, rmoe_class,
                             resolve_moe_blocks, select_ffns)
from .rmoe_cvt import RMoECvT
from .rmoe_swin import RMoESwinTransformer, RMoESwinTransformerDet

__all__ = [
    'CvT', 'FFNSite', 'RMoEBackboneMixin', 'RMoECvT', 'RMoESwinTransformer',
    'RMoESwinTransformerDet', 'convert_ffns', 'find_ffns', 'resolve_moe_blocks', 'rmoe_class',
    'select_ffns'
]
