"""Algebra on tuples of tensors (the solvers' vectors): inner products, norms, ``y + αx``.

Eagerly, each helper makes one fused call for all the tensors (``torch._foreach_*``): on
CUDA one launch instead of one or two per tensor, which is what small solver steps are
bound by there, and on the CPU one dispatch. Under ``torch.compile`` they use plain
per-tensor ops, which inductor fuses itself. Inner products use ``torch.dot`` on CUDA only:
on the CPU its BLAS threads slow the whole process down (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from .typing import Tensors

__all__ = ["axpy", "dot", "flat", "leaf_norms", "norm", "scale", "unflat", "zeros_like"]


def _fused() -> bool:
    return not torch.compiler.is_compiling()


def _blas_dot(x: Sequence[Tensor]) -> bool:
    return x[0].is_cuda and _fused()


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σᵢ ⟨aᵢ, bᵢ⟩ as a 0-dim tensor (no host sync)."""
    if not _blas_dot(a):
        return cast(Tensor, sum((x * y).sum() for x, y in zip(a, b)))
    dots = [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]
    return dots[0] if len(dots) == 1 else torch.stack(dots).sum()


def norm(a: Sequence[Tensor]) -> Tensor:
    """‖a‖₂ over all the tensors, as a 0-dim tensor (no host sync)."""
    if not _fused():
        return dot(a, a).sqrt()
    return torch.linalg.vector_norm(torch.stack(leaf_norms(a)))


def leaf_norms(a: Sequence[Tensor]) -> list[Tensor]:
    """[‖aᵢ‖₂ for each tensor], 0-dim tensors (one fused call)."""
    if not _fused():
        return [torch.linalg.vector_norm(t) for t in a]
    return list(torch._foreach_norm(list(a)))


def axpy(alpha: float | Tensor, x: Sequence[Tensor], y: Sequence[Tensor]) -> Tensors:
    """``y + alpha * x`` leaf-wise."""
    if not _fused():
        return tuple(yi + alpha * xi for xi, yi in zip(x, y))
    if isinstance(alpha, Tensor):
        return tuple(torch._foreach_add(list(y), torch._foreach_mul(list(x), alpha)))
    return tuple(torch._foreach_add(list(y), list(x), alpha=alpha))


def scale(alpha: float | Tensor, x: Sequence[Tensor]) -> Tensors:
    if not _fused():
        return tuple(alpha * xi for xi in x)
    return tuple(torch._foreach_mul(list(x), alpha))


def flat(x: Sequence[Tensor]) -> Tensor:
    """Concatenate a tuple of tensors into one vector."""
    return torch.cat([xi.reshape(-1) for xi in x])


def unflat(vector: Tensor, like: Sequence[Tensor]) -> Tensors:
    """Split a vector (or a batch ``(..., P)``) back into tensors shaped like ``like``."""
    out, start = [], 0
    batch = vector.shape[:-1]
    for t in like:
        n = t.numel()
        out.append(vector[..., start : start + n].reshape(batch + t.shape))
        start += n
    return tuple(out)


def zeros_like(tensors: Sequence[Tensor]) -> Tensors:
    """Zeros shaped like each tensor."""
    return tuple(torch.zeros_like(t) for t in tensors)
