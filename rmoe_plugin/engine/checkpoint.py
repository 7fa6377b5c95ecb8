"""Loading mmengine checkpoints under torch's ``weights_only=True`` default.

torch >= 2.6 refuses any global not on its allow-list; mmengine's checkpoints hold numpy
scalars and arrays and its ``HistoryBuffer`` (the message hub's state), so resume and
``load_from`` fail. We allow-list exactly those types: plain data containers whose
reconstruction runs no code from the file. ``weights_only`` itself stays on.
"""
import numpy as np
import torch
from mmengine.logging import HistoryBuffer


def _numpy_core():
    return getattr(np, '_core', None) or np.core  # numpy 2 renamed np.core to np._core


def mmengine_checkpoint_globals() -> list:
    """The harmless types mmengine checkpoints pickle besides tensors."""
    core = _numpy_core()
    dtype_classes = {type(np.dtype(name)) for name in (
        'bool', 'int8', 'uint8', 'int16', 'int32', 'int64', 'float16', 'float32', 'float64')}
    return [HistoryBuffer, np.ndarray, np.dtype, core.multiarray._reconstruct,
            core.multiarray.scalar, *sorted(dtype_classes, key=lambda c: c.__name__)]


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own checkpoints."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
