"""Peak live tensor memory on any device (CPU included), for tests and the memory benchmark's CPU mode.

``torch.cuda.max_memory_allocated`` has no CPU counterpart, so :class:`PeakTensorMemory` counts it itself: a
``TorchDispatchMode`` that sees every tensor an operator returns inside the ``with`` block, adds the bytes of
each new storage when it appears and subtracts them when the storage is freed (a weak reference on it). The
peak is the largest sum of live storages made inside the block: activations, not the weights or inputs made
before it. Scratch memory a kernel allocates and frees inside one operator (e.g. SDPA's workspace) is not a
tensor and is not seen; on CUDA, measure with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as mem: ...``; then ``mem.peak`` / ``mem.current`` in bytes (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._refs.pop(key, None)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = size
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))
        self.current += size
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out
