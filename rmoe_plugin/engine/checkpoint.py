"""Loading mmengine checkpoints under torch's ``weights_only=True`` default.

torch >= 2.6 refuses any global not on its allow-list; mmengine's checkpoints hold numpy
scalars and arrays and its ``HistoryBuffer`` (the message hub's state), so resume and
``load_from`` fail. We allow-list exactly those types: plain data containers whose
reconstruction runs no code from the file. ``weights_only`` itself stays on.

``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``. Rather
than allowing the builtin ``getattr`` (any attribute of any allowed object), the name
``builtins.getattr`` is bound to a stand-in that only hands out those methods.
"""
import importlib
import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer


def _numpy_multiarray():
    # numpy 2 renamed numpy.core to numpy._core; pickles name the module of the writer's numpy.
    name = 'numpy._core.multiarray' if int(np.__version__.split('.')[0]) >= 2 else \
        'numpy.core.multiarray'
    return importlib.import_module(name)


def history_buffer_statistic(owner, name: str):
    """``getattr`` as seen by the unpickler: public methods of ``HistoryBuffer`` only."""
    if owner is HistoryBuffer and not name.startswith('_') and callable(
            vars(HistoryBuffer).get(name)):
        return getattr(owner, name)
    raise pickle.UnpicklingError(
        f'checkpoint asks for attribute {name!r} of {owner!r}; only HistoryBuffer statistics '
        'methods are allowed')


def mmengine_checkpoint_globals() -> list:
    """The harmless types mmengine checkpoints pickle besides tensors."""
    multiarray = _numpy_multiarray()
    dtype_classes = {type(np.dtype(name)) for name in (
        'bool', 'int8', 'uint8', 'int16', 'int32', 'int64', 'float16', 'float32', 'float64')}
    return [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct,
            multiarray.scalar, *sorted(dtype_classes, key=lambda c: c.__name__),
            (history_buffer_statistic, 'builtins.getattr')]


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own checkpoints."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
