from .dense_ffn import DenseFFN, describe_dense_ffn, is_dense_ffn
from .ffn import RMoEFFN
from .pooling import ListGlobalAveragePooling
from .task_models import (RMoECascadeRCNN, RMoEEncoderDecoder, RMoEImageClassifier, RMoEMaskRCNN,
                          rmoe_model)

__all__ = [
    'DenseFFN', 'ListGlobalAveragePooling', 'RMoECascadeRCNN', 'RMoEEncoderDecoder', 'RMoEFFN',
    'RMoEImageClassifier', 'RMoEMaskRCNN', 'describe_dense_ffn', 'is_dense_ffn', 'rmoe_model'
]
