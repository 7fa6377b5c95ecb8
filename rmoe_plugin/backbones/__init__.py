from .cvt import CvT
from .rmoe_swin import RMoESwinTransformer, RMoESwinTransformerDet, resolve_moe_blocks

__all__ = ['CvT', 'RMoESwinTransformer', 'RMoESwinTransformerDet', 'resolve_moe_blocks']
