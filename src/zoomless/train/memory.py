"""Measuring what a training step holds in memory, on any device (CPU included) and deterministically.

- `PeakTensorMemory`: the peak total size of the tensors created inside a block and still alive,
  followed op by op through a TorchDispatchMode (forward and backward). Tensors that existed before
  the block (weights, inputs) are not counted, nor are views of them. On CUDA the allocator's
  `torch.cuda.max_memory_allocated` tells the same story; this works where there is no allocator
  to ask, and gives the same number on every machine.
- `SavedTensorMemory`: the bytes autograd keeps between the forward and the backward pass (what
  `torch.autograd.graph.saved_tensors_hooks` sees), each storage counted once.

Both count storages, not tensors, so views and repeated saves of one buffer count once. Neither
sees a kernel's private workspace; both are for comparing implementations of one computation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    return [t.untyped_storage() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


class PeakTensorMemory(TorchDispatchMode):
    """`with PeakTensorMemory() as m: step()` then `m.peak` (bytes) and `m.current` (still alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage id -> (weak ref, bytes)
        self.current = 0
        self.peak = 0

    def _prune(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._prune()  # frees happen between ops; drop them before adding this op's outputs
        inputs = {StorageWeakRef(s).cdata for s in _storages((args, kwargs))}
        for s in _storages(out):
            ref = StorageWeakRef(s)
            if ref.cdata in inputs or ref.cdata in self.live:  # a view or an in-place result: no new bytes
                continue
            self.live[ref.cdata] = (ref, s.nbytes())
            self.current += s.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class SavedTensorMemory(torch.autograd.graph.saved_tensors_hooks):
    """`with SavedTensorMemory() as m: loss = f(x)` then `m.bytes`: what autograd saved for backward."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}  # storage id -> bytes (saved tensors stay alive: ids stay unique)

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            self.sizes[StorageWeakRef(s).cdata] = s.nbytes()
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> "SavedTensorMemory":
        super().__enter__()
        return self

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())
