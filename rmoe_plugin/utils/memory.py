"""Peak tensor memory of a piece of work, on the CPU as on a GPU.

CUDA's caching allocator counts its own peak (``torch.cuda.max_memory_allocated``); the CPU
allocator keeps no such count, so :class:`PeakMemory` keeps it at the tensor level: every
storage an op creates inside the context is counted until it is freed. An op's output that
shares storage with one of its inputs (a view, an in-place or ``out=`` op) allocates nothing,
so storages that existed before (parameters, optimizer state, inputs) are never counted.
"""
import weakref
from typing import Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage created inside the context: ``current`` and ``peak``."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: Dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)  # the storage's Python object lives exactly as long as the storage
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if t is not None}
    return sum(storages.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer):
    return [v for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]
