from .tiny import make_ade20k, make_coco

__all__ = ['make_ade20k', 'make_coco']
