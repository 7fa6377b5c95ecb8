from .ffn import RMoEFFN

__all__ = ['RMoEFFN']
