"""Measure the memory held by autograd graphs, on any device."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedTensorMemory"]


class _Saved:
    """A tensor saved for backward, counted while autograd keeps it alive."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, tensor: Tensor, meter: SavedTensorMemory, key: int) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorMemory:
    """Context manager: live and peak bytes of distinct storages saved for backward.

    Counts what autograd graphs keep alive (activations, intermediate results), each storage
    once, from entering until graphs created inside are freed. Works on CPU, where
    allocator statistics are unavailable; on CUDA, ``torch.cuda.max_memory_allocated`` is
    the complementary whole-process measure.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._counts: dict[int, list[int]] = {}
        self._hooks: Any = None

    def _pack(self, tensor: Tensor) -> _Saved:
        try:
            key = tensor.untyped_storage().data_ptr()
        except RuntimeError:  # no storage of its own (some tensors forward-mode AD saves): no bytes
            return _Saved(tensor.detach(), self, -1)
        entry = self._counts.get(key)
        if entry is None:
            nbytes = tensor.untyped_storage().nbytes()
            self._counts[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[0] += 1
        # a detached alias: the saved output of an op would otherwise hold its own grad_fn in a
        # reference cycle through autograd (C++), leaking graphs dropped without a backward;
        # autograd re-attaches the grad_fn of a saved output when it unpacks it
        return _Saved(tensor.detach(), self, key)

    def _release(self, key: int) -> None:
        entry = self._counts.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._counts[key]

    @staticmethod
    def _unpack(saved: _Saved) -> Tensor:
        return saved.tensor

    def __enter__(self) -> SavedTensorMemory:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
