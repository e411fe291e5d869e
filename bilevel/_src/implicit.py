"""Implicit differentiation (IFT) around a stationary point, shared by the ``implicit-*`` modes.

    dg/dφ = ∂g/∂φ − (∂G/∂φ)ᵀ x,   Jᵀ x = ∂g/∂θ,   J = ∂G/∂θ,

with ``G = ∇θ f`` (so ``Jᵀ = H`` and ``(∂G/∂φ)ᵀ = ∇²φθ f``) unless the problem supplies
another stationarity map. Assumes ``θ`` is (close to) a point where ``G(θ, φ) = 0``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import check_finite, deferred_finite_checks
from .products import StationarityJacobian
from .problem import BilevelProblem
from .solvers import SolveResult
from .tree_math import axpy, scale
from .typing import Tensors
from .stats import Stats

Solve = Callable[[StationarityJacobian, Tensors], SolveResult]


def outer_gradients(problem: BilevelProblem, theta: Tensors,
                    phi: Tensors) -> tuple[Tensors, tuple[Tensor | None, ...]]:
    """``(∂g/∂θ, ∂g/∂φ)`` at the given leaves: zeros in ``∂g/∂θ`` where ``g`` does not depend
    on a tensor, None in ``∂g/∂φ`` (no direct term to add)."""
    with torch.enable_grad():
        g = problem.outer(theta, phi)
        check_finite((g,), "the value of outer_loss")
        grads = torch.autograd.grad(g, theta + phi, allow_unused=True)
    if all(x is None for x in grads):
        raise ValueError("outer_loss depends on neither params nor hparams; compute it from the "
                         "arguments the closure receives (or, for modules, by calling the module)")
    v = tuple(torch.zeros_like(t) if x is None else x for x, t in zip(grads, theta))
    direct = grads[len(theta):]
    check_finite(v, "the gradient of outer_loss w.r.t. params")
    check_finite(direct, "the gradient of outer_loss w.r.t. hparams")
    return v, direct


def subtract_mixed(direct: Sequence[Tensor | None], mixed: Tensors) -> Tensors:
    """``∂g/∂φ − (∂G/∂φ)ᵀx`` leaf-wise, ``−(∂G/∂φ)ᵀx`` where there is no direct term."""
    if all(d is None for d in direct):
        return scale(-1.0, mixed)
    if all(d is not None for d in direct):
        return axpy(-1.0, mixed, direct)
    return tuple(-m if d is None else d - m for d, m in zip(direct, mixed))


LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_autocast(value: object) -> None:
    """Validate an ``autocast`` option."""
    if value is not None and value not in LOW_PRECISION:
        raise TypeError(f"option autocast must be None, torch.bfloat16 or torch.float16, got {value!r}")


def low_precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device`` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def implicit_hypergradient(problem: BilevelProblem, solve: Solve, stats: Stats,
                           autocast: torch.dtype | None = None) -> Tensors:
    """The IFT hypergradient with ``x`` from ``solve(operator, v)``; fills ``stats``.

    With ``autocast`` (bf16/fp16) the inner loss and its gradient graph are built under
    ``torch.autocast``, so every Hessian and mixed product runs its matmuls in that dtype;
    the products come out in the params' dtype, where the solver accumulates."""
    if autocast is not None and problem.dtype != torch.float32:
        raise ValueError(f"autocast={autocast} lowers the precision of float32 products, but params "
                         f"are {problem.dtype}; use float32 params, or autocast=None")
    theta, phi = problem.leaf_copies()
    # The NaN/inf checks of the setup and of the mixed product are read together when the
    # block ends: the setup's reads need not drain the device queue before the solve starts.
    # A solver error on a NaN that the setup made (a non-finite product) gives way to the
    # setup's error, which names where the NaN appeared.
    with deferred_finite_checks():
        with low_precision(problem.device, autocast):
            field = problem.stationarity(theta, phi)
        v, direct = outer_gradients(problem, theta, phi)
        operator = StationarityJacobian(field, theta, phi, lambda: problem.suspects(theta, phi))
        result = solve(operator, v)
        mixed = operator.mixed(result.x)
    stats.hvps = operator.products
    stats.iters = result.iters
    stats.residual = result.residual
    stats.converged = result.converged
    stats.negative_curvature = result.negative_curvature
    stats.diverged = result.diverged
    stats.singular = result.singular
    stats.extra["hparams_unused_by_inner"] = all(operator.unused)
    return subtract_mixed(direct, mixed)
