"""Measuring the memory that autograd graphs hold, on any device."""

from ._src.memory import SavedTensorMemory

__all__ = ["SavedTensorMemory"]
