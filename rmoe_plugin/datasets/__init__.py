from .tiny import make_ade20k, make_coco, make_imagenet

__all__ = ['make_ade20k', 'make_coco', 'make_imagenet']
