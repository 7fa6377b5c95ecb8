from .ffn import RMoEFFN
from .segmentors import RMoECascadeRCNN, RMoEEncoderDecoder, RMoEMaskRCNN, rmoe_model

__all__ = ['RMoECascadeRCNN', 'RMoEEncoderDecoder', 'RMoEFFN', 'RMoEMaskRCNN', 'rmoe_model']
