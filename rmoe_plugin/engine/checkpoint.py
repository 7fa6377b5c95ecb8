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
import os
import pickle
import tempfile
from typing import Dict, Iterable, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

StateDict = Dict[str, torch.Tensor]


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

def load_checkpoint_file(path: str) -> dict:
    """Load a checkpoint without ever running code from it (``weights_only=True``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint torch can read as data only.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f'refusing checkpoint {path!r}: loading it would run code or build objects other '
            f'than tensors and plain data ({str(e).splitlines()[0]})') from e

def save_checkpoint_atomic(obj: dict, path: str) -> None:
    """Write ``obj`` to ``path`` through a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.pth', dir=folder)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

def extract_state_dict(checkpoint: dict) -> StateDict:
    """The tensors of a checkpoint: its ``state_dict`` or ``model`` entry, else itself."""
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint

def check_output_path(inputs: Union[str, Iterable[str]], out_path: str,
                      overwrite: bool = False) -> None:
    """Refuse to write over an input, or over an existing file unless ``overwrite``."""
    if not os.path.exists(out_path):
        return
    for in_path in [inputs] if isinstance(inputs, str) else inputs:
        if os.path.exists(in_path) and os.path.samefile(in_path, out_path):
            raise ValueError(f'output {out_path!r} is the input {in_path!r}; '
                             'choose another path')
    if not overwrite:
        raise FileExistsError(f'output {out_path!r} exists; pass --overwrite to replace it')
