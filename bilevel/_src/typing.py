"""The types the package passes around, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["Closure", "MatVec", "Tensors"]

#: a flat tuple of tensors: params θ, hparams φ, or a vector of the solvers
Tensors = tuple[Tensor, ...]
#: ``x ↦ A x`` on flat tuples of tensors
MatVec = Callable[[Tensors], Tensors]
#: a user loss ``(params, hparams) -> scalar tensor``
Closure = Callable[[Any, Any], Tensor]
