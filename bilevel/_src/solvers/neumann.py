"""The truncated Neumann series ``A⁻¹ v ≈ α Σ_{j<K} (I − αA)ʲ v`` and the power iteration
that picks its step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import axpy, leaf_norms, norm, scale
from ..typing import MatVec, Tensors
from .result import SolveResult

__all__ = [
    "DIVERGED",
    "neumann",
    "neumann_report",
    "power_iteration",
    "power_iteration_estimate",
    "random_start",
]

DIVERGED = (
    "the Neumann series diverged (its terms grew): some eigenvalue λ of the inner Hessian has "
    "|1 − αλ| ≥ 1. Either alpha is above 2/λmax (lower alpha, or use alpha='auto'), or λ < 0: "
    "the Hessian is indefinite (params is not a minimum), which no alpha fixes; train params "
    "closer to a minimum, or solve the indefinite system with implicit-exact (small problems) "
    "or implicit-gmres"
)


def neumann(
    matvec: MatVec,
    v: Tensors,
    iters: int,
    alpha: float | Tensor,
    residual: bool = True,
    sync: bool = True,
    tol: float = 1e-3,
) -> SolveResult:
    """Truncated Neumann series ``x = α Σ_{j<K} (I − αA)ʲ v`` with ``K = iters`` terms.

    Uses ``K`` products: ``K − 1`` for the terms and one more for the exact residual
    ``v − A x = (I − αA)ᴷ v``. With ``residual=False`` it skips that product (``K − 1``
    products) and reports no residual; divergence is then judged on the last term
    ``(I − αA)ᴷ⁻¹ v``, the residual of the first ``K − 1`` terms. Converges for any ``A``
    (symmetric or not) whose spectrum lies in the disc |1 − αλ| < 1, e.g. SPD ``A`` with
    ``α < 2/λmax``. ``converged``: the residual is at most ``tol`` (None without it). The
    breakdown ``"diverged"`` is set when the judged norm grew above
    ‖v‖, or to twice the smallest norm of the series (for SPD ``A`` with ``α < 2/λmax`` the
    terms never grow).

    ``sync=False``: no host synchronisation (``alpha`` may be a tensor), for compiled code;
    the norms ‖(I − αA)ʲ v‖ are left in ``info["norms"]`` for :func:`neumann_report`.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    # per term only the leaves' norms (one fused call); they are combined at the end
    term, total = v, v
    norms = [leaf_norms(v)]
    for j in range(1, iters + 1 if residual else iters):
        term = axpy(-alpha, matvec(term), term)
        norms.append(leaf_norms(term))
        if j < iters:
            total = axpy(1.0, term, total)
    table = torch.stack([n for row in norms for n in row]).reshape(len(norms), -1)
    result = SolveResult(
        x=scale(alpha, total),
        products=iters if residual else iters - 1,
        iters=iters,
        info={"norms": torch.linalg.vector_norm(table, dim=1)},
    )
    return neumann_report(result, float(alpha), residual, tol) if sync else result


def neumann_report(
    result: SolveResult, alpha: float, residual: bool = True, tol: float = 1e-3
) -> SolveResult:
    """The host numbers of a series (one read of its norms): raises on non-finite terms,
    flags divergence."""
    norms = result.info["norms"]
    norms_host = norms.tolist()
    v_norm, norms_host = norms_host[0], norms_host[1:]
    for j, value in enumerate(norms_host, start=1):
        if not math.isfinite(value):
            raise NonFiniteError(
                f"non-finite values in term {j} of the Neumann series (product {j}); "
                f"alpha={alpha:g} may be above 2/λmax: lower it or use alpha='auto'"
            )
    x, iters = result.x, result.iters
    if not norms_host:  # one term and no residual: x = αv, nothing to judge
        return SolveResult(x=x, products=0, iters=iters)
    last = norms_host[-1] / v_norm if v_norm > 0 else 0.0
    best = min(norms_host) / v_norm if v_norm > 0 else 0.0
    # for SPD A with α < 2/λmax the terms (I − αA)ʲ v never grow; growth to twice the best
    # value (above rounding) means some |1 − αλ| > 1, even before it exceeds ‖v‖
    growing = last > 2.0 * best and last > torch.finfo(norms.dtype).eps ** 0.5
    diverged = last > 1.0 or growing
    breakdown, message = ("diverged", DIVERGED) if diverged else (None, "")
    if not residual:
        return SolveResult(
            x=x,
            products=iters - 1,
            iters=iters,
            converged=False if diverged else None,
            breakdown=breakdown,
            message=message,
        )
    return SolveResult(
        x=x,
        products=iters,
        iters=iters,
        residual=last,
        converged=last <= tol and not diverged,
        breakdown=breakdown,
        message=message,
    )


def power_iteration(
    matvec: MatVec, like: Tensors, iters: int = 10, generator: torch.Generator | None = None
) -> float:
    """Estimate the largest |eigenvalue| of ``A`` by ``iters`` products from a random start."""
    value = float(power_iteration_estimate(matvec, random_start(like, generator), iters))
    if not math.isfinite(value):
        raise NonFiniteError(
            "non-finite values in the power iteration that estimates the largest curvature for alpha='auto'"
        )
    return value


def random_start(like: Tensors, generator: torch.Generator | None = None) -> Tensors:
    """A random unit vector shaped like ``like``, drawn on the CPU (reproducible on any device)."""
    u = tuple(
        torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device) for t in like
    )
    return scale(1.0 / norm(u), u)


def power_iteration_estimate(matvec: MatVec, u: Tensors, iters: int) -> Tensor:
    """‖A uₖ‖ after ``iters`` power iterations from the unit vector ``u``, as a 0-dim tensor
    (no host synchronisation)."""
    estimate = torch.zeros((), dtype=u[0].dtype, device=u[0].device)
    for _ in range(iters):
        au = matvec(u)
        estimate = norm(au)
        u = scale(1.0 / estimate.clamp_min(torch.finfo(estimate.dtype).tiny), au)
    return estimate
