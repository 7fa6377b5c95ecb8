"""Loading checkpoints from wherever mmengine finds them, weights only; saving them atomically.

torch >= 2.6 refuses any global not on its allow-list; mmengine's checkpoints hold numpy
scalars and arrays and its ``HistoryBuffer`` (the message hub's state), so resume and
``load_from`` fail. We allow-list exactly those types: plain data containers whose
reconstruction runs no code from the file. ``weights_only`` itself stays on.

numpy 2 renamed ``numpy.core`` to ``numpy._core`` and a pickle names the module of the numpy
that wrote it, so both spellings are allowed, each bound to the installed numpy's object: a
checkpoint moves between numpy 1 and 2 in either direction.

``HistoryBuffer`` pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``. Rather
than allowing the builtin ``getattr`` (any attribute of any allowed object), the name
``builtins.getattr`` is bound to a stand-in that hands out those four methods and nothing else.

mmengine's ``CheckpointLoader`` reads local paths, ``http(s)://``, ``open-mmlab://``,
``torchvision://``, ``mmcls://``, ``s3://`` and ``pavi://``, but several of its loaders leave
``weights_only`` to ``torch.load``'s default, and the one for URLs (the others' too, once they
have found their URL) calls ``torch.hub.load_state_dict_from_url``, whose default is
``weights_only=False``: a downloaded pickle could run code, in ``load_from`` as in a
backbone's ``init_cfg``. The loaders below do what mmengine 0.10.7's do, URL tables and
download cache (``<torch.hub.get_dir()>/checkpoints``) included, with ``weights_only=True``
passed explicitly; :func:`allow_mmengine_checkpoints` puts them in place of mmengine's under
mmengine's own prefixes.
"""
import functools
import importlib
import io
import os
import pickle
import sys
import tempfile
import urllib.error
import urllib.parse
from http.client import HTTPException
from typing import Callable, Dict, Iterable, Optional, Union

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.fileio import get_file_backend
from mmengine.logging import HistoryBuffer
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

from ..fileio import atomic_write

StateDict = Dict[str, torch.Tensor]

# What HistoryBuffer.__getstate__ pickles besides arrays: the statistics methods that
# HistoryBuffer._set_default_statistics registers, each by name.
HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')
NUMPY_MULTIARRAY_MODULES = ('numpy.core.multiarray', 'numpy._core.multiarray')


def _numpy_multiarray():
    # numpy 1.26 has a numpy._core shim and numpy 2 a numpy.core one (which warns): import the
    # installed numpy's own module.
    major = int(np.__version__.split('.')[0])
    return importlib.import_module(NUMPY_MULTIARRAY_MODULES[major >= 2])


def history_buffer_statistic(owner, name: str):
    """``getattr`` as seen by the unpickler: ``HistoryBuffer``'s statistics methods only."""
    if owner is HistoryBuffer and name in HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'Trying to get attribute {name!r} of {owner!r}: only HistoryBuffer statistics '
        f'methods {HISTORY_BUFFER_STATISTICS} are allowed')


def mmengine_checkpoint_globals() -> list:
    """The harmless types mmengine checkpoints pickle besides tensors, for
    ``torch.serialization.add_safe_globals``."""
    multiarray = _numpy_multiarray()
    dtype_classes = {type(np.dtype(name)) for name in (
        'bool', 'int8', 'uint8', 'int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64',
        'float16', 'float32', 'float64')}
    numpy_functions = [(getattr(multiarray, name), f'{module}.{name}')
                       for module in NUMPY_MULTIARRAY_MODULES
                       for name in ('_reconstruct', 'scalar')]
    return [HistoryBuffer, np.ndarray, np.dtype, *numpy_functions,
            *sorted(dtype_classes, key=lambda c: c.__name__),
            (history_buffer_statistic, 'builtins.getattr')]


@functools.lru_cache(maxsize=None)
def _allow_checkpoint_globals() -> None:
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())


def allow_mmengine_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own checkpoints, and make every
    scheme of mmengine's ``CheckpointLoader`` (``load_from``, resume, ``init_cfg``) load that
    way. Idempotent."""
    _allow_checkpoint_globals()
    for prefix, loader in list(CheckpointLoader._schemes.items()):
        if loader in _WEIGHTS_ONLY_LOADERS:
            CheckpointLoader.register_scheme(prefix, _WEIGHTS_ONLY_LOADERS[loader], force=True)


def load_checkpoint_file(uri: str, map_location='cpu') -> dict:
    """Load a checkpoint from anything mmengine's ``CheckpointLoader`` reads, weights only.

    ``uri`` is a local path, an ``http(s)://`` URL (downloaded once into
    ``<torch.hub.get_dir()>/checkpoints``, where mmengine caches it too), or an
    ``open-mmlab://``, ``torchvision://``, ``mmcls://``, ``s3://`` or ``pavi://`` name.

    Raises:
        FileNotFoundError: the file does not exist or the URL cannot be downloaded (the
            message names the URL and the reason).
        ValueError: the file is not a checkpoint torch can read as tensors and plain data
            (a pickle that would run code, say), or ``uri`` names a scheme or model
            mmengine does not know.
    """
    if not isinstance(uri, (str, os.PathLike)):
        raise TypeError(f'checkpoint must be a path or URI string, got {type(uri).__name__}')
    uri = os.fspath(uri)
    loader = CheckpointLoader._get_checkpoint_loader(uri)
    loader = _WEIGHTS_ONLY_LOADERS.get(loader, loader)
    if loader not in _WEIGHTS_ONLY_LOADERS.values():
        raise ValueError(f'checkpoint {uri!r}: its scheme is read by {loader.__module__}.'
                         f'{loader.__qualname__}, which is not known to load weights only')
    return loader(uri, map_location)


def _load_weights_only(source, name: str, map_location, cached: Optional[str] = None) -> dict:
    """``torch.load(source, weights_only=True)``, its refusals naming ``name`` (and the
    cached copy of a download, which a bad file stays in until removed)."""
    _allow_checkpoint_globals()
    where = f' (downloaded to {cached})' if cached else ''
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if reason.startswith(_REFUSALS):
            raise ValueError(
                f'refusing checkpoint {name!r}{where}: it holds more than tensors and plain '
                f'data, and loading it could run code from the file ({reason})') from e
        raise ValueError(f'checkpoint {name!r}{where} is not a torch checkpoint ({reason})') \
            from e
    except RuntimeError as e:
        if 'PytorchStreamReader' not in str(e):
            raise
        raise ValueError(f'checkpoint {name!r}{where} is not a readable torch checkpoint '
                         f'({str(e).splitlines()[0]})') from e


# How torch's weights-only unpickler words a refusal of something it does not allow (rather
# than bytes it cannot parse).
_REFUSALS = ('Unsupported global', 'Trying to', 'Can only', 'Unsupported class')
# torch's general advice around the unpickler's reason (among it, to allow-list the global
# or to turn weights_only off, neither of which we want).
_ADVICE = ('Weights only load failed', 'Check the documentation', 'Please file an issue')


def _unpickling_reason(error: Exception) -> str:
    paragraphs = [p.strip() for p in str(error).split('\n\n')]
    reasons = [p.replace('WeightsUnpickler error:', '').strip() for p in paragraphs
               if p and not p.startswith(_ADVICE)]
    reason = next((r for r in reasons if r), paragraphs[0])
    return reason.split(' Please use ', 1)[0].replace('\n', ' ')


def load_from_local(filename: str, map_location=None) -> dict:
    """A local file (``~`` expanded), weights only."""
    path = os.path.expanduser(filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {filename!r} does not exist')
    return _load_weights_only(path, filename, map_location)


def load_from_http(url: str, map_location=None, model_dir: Optional[str] = None,
                   progress: bool = os.isatty(0)) -> dict:
    """A URL, downloaded once into ``<torch.hub.get_dir()>/checkpoints`` (as mmengine's
    loader does: rank 0 first, the other ranks after a barrier), weights only."""
    rank, world_size = get_dist_info()
    if rank == 0:
        path = _download(url, model_dir, progress)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            path = _download(url, model_dir, progress)
    return _load_weights_only(path, url, map_location, cached=path)


def _download(url: str, model_dir: Optional[str], progress: bool = False) -> str:
    """The cached copy of ``url``, downloaded if absent (torch writes it under a temporary
    name and renames it when complete, so a failed download leaves no cache entry)."""
    model_dir = model_dir or os.path.join(torch.hub.get_dir(), 'checkpoints')
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f'checkpoint URL {url!r} names no file')
    cached = os.path.join(model_dir, name)
    if os.path.exists(cached):
        return cached
    os.makedirs(model_dir, exist_ok=True)
    sys.stderr.write(f'Downloading: "{url}" to {cached}\n')
    try:
        torch.hub.download_url_to_file(url, cached, progress=progress)
    except urllib.error.HTTPError as e:
        raise FileNotFoundError(
            f'checkpoint {url!r} could not be downloaded: HTTP {e.code} {e.reason}') from e
    except (urllib.error.URLError, HTTPException, OSError) as e:
        reason = getattr(e, 'reason', None) or e
        raise FileNotFoundError(
            f'checkpoint {url!r} could not be downloaded: {reason}') from e
    return cached


def _model_name(uri: str, table: dict) -> str:
    name = uri.split('://', 1)[1]
    if name not in table:
        raise ValueError(f'checkpoint {uri!r}: mmengine knows no model {name!r} under '
                         f'{uri.split("://", 1)[0]}://')
    return name


def load_from_torchvision(uri: str, map_location=None) -> dict:
    """``torchvision://name`` (or the older ``modelzoo://name``) through mmengine's table."""
    urls = mmengine_checkpoint.get_torchvision_models()
    return load_from_http(urls[_model_name(uri, urls)], map_location)


def load_from_openmmlab(uri: str, map_location=None) -> dict:
    """``open-mmlab://name`` through mmengine's tables: a URL, or a file in mmengine's home."""
    scheme, name = uri.split('://', 1)
    name = mmengine_checkpoint.get_deprecated_model_names().get(name, name)
    urls = mmengine_checkpoint.get_external_models()
    url = urls[_model_name(f'{scheme}://{name}', urls)]
    if url.startswith(('http://', 'https://')):
        return load_from_http(url, map_location)
    return load_from_local(os.path.join(mmengine_checkpoint._get_mmengine_home(), url),
                           map_location)


def load_from_mmcls(uri: str, map_location=None) -> dict:
    """``mmcls://name`` through mmengine's table, its backbone keys unprefixed as mmengine
    does."""
    urls = mmengine_checkpoint.get_mmcls_models()
    checkpoint = load_from_http(urls[_model_name(uri, urls)], map_location)
    return mmengine_checkpoint._process_mmcls_checkpoint(checkpoint)


def load_from_ceph(uri: str, map_location=None, backend: str = 'petrel') -> dict:
    """``s3://`` / ``petrel://`` through mmengine's file backend, weights only."""
    data = get_file_backend(uri, backend_args=dict(backend=backend)).get(uri)
    with io.BytesIO(data) as buffer:
        return _load_weights_only(buffer, uri, map_location)


def load_from_pavi(uri: str, map_location=None) -> dict:
    """``pavi://`` through pavi's model cloud, weights only."""
    try:
        from pavi import modelcloud
    except ImportError as e:
        raise ImportError(f'checkpoint {uri!r}: install pavi to load from its model cloud') \
            from e
    model = modelcloud.get(uri[len('pavi://'):])
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, model.name)
        model.download(path)
        return _load_weights_only(path, uri, map_location)


# mmengine's loader -> ours; mmengine's CheckpointLoader keeps the prefixes.
_WEIGHTS_ONLY_LOADERS: Dict[Callable, Callable] = {
    mmengine_checkpoint.load_from_local: load_from_local,
    mmengine_checkpoint.load_from_http: load_from_http,
    mmengine_checkpoint.load_from_torchvision: load_from_torchvision,
    mmengine_checkpoint.load_from_openmmlab: load_from_openmmlab,
    mmengine_checkpoint.load_from_mmcls: load_from_mmcls,
    mmengine_checkpoint.load_from_ceph: load_from_ceph,
    mmengine_checkpoint.load_from_pavi: load_from_pavi,
}


def save_checkpoint_atomic(obj: dict, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`~rmoe_plugin.fileio.atomic_write`: a crash
    leaves the old file or the new one, never a truncated checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, 'wb') as f:
        torch.save(obj, f)


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
