"""Exact peak of the tensor memory a call allocates, on any device (benchmarks of issue 4).

The process's peak RSS moves with allocator caching and with whatever else the machine does, and
CPU PyTorch has no ``max_memory_allocated``. ``TensorMemoryTracker`` instead follows every tensor
storage created while it is active (forward and backward ops alike, through a
``TorchDispatchMode``) until the storage is freed, and records the largest total alive at once.
Storages that existed before (the model, the table, the batch) and in-place results are not
counted, so the figure is what one step needs on top of the model and its inputs.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """``with TensorMemoryTracker() as t: step()``, then ``t.peak_bytes`` / ``t.live_bytes``.

    Checked on CPU (``tests/unit/test_tensor_memory.py``), where autograd runs the backward in the
    calling thread. On CUDA ``torch.cuda.max_memory_allocated`` is the allocator's own figure; the
    benchmarks report both.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # storage data_ptr -> bytes
        self.live_bytes = 0
        self.peak_bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            # views and in-place results share an input's storage; empty storages cost nothing
            if key in inputs or key in self._live or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
