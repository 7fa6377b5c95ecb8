from .rmoe_swin import RMoESwinTransformer, RMoESwinTransformerDet, resolve_moe_blocks

__all__ = ['RMoESwinTransformer', 'RMoESwinTransformerDet', 'resolve_moe_blocks']
