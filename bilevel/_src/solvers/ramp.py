"""A damping ramp for CG on Hessians that may be indefinite."""

from __future__ import annotations

from ..typing import MatVec, Tensors
from .cg import conjugate_gradient
from .result import SolveResult

__all__ = ["damping_ramp"]


def damping_ramp(
    matvec: MatVec,
    v: Tensors,
    iters: int,
    tol: float,
    damping: float,
    growth: float = 4.0,
    x0: Tensors | None = None,
    overlap: bool | None = None,
    reorthogonalize: bool = False,
) -> tuple[SolveResult, float]:
    """CG on ``(A + λI) x = v`` from ``λ = damping``, multiplying λ by ``growth`` and
    restarting from zero each time CG meets negative curvature, which proves
    ``λmin(A) ≤ −λ``; at most ``iters`` products in all. Returns the last solve (with the
    products and iterations of all of them) and its λ; the other arguments are
    :func:`conjugate_gradient`'s."""
    if damping <= 0 or growth <= 1:
        raise ValueError(f"the damping ramp needs damping > 0 and growth > 1, got {damping} and {growth}")
    products, steps = 0, 0
    while True:
        result = conjugate_gradient(
            matvec, v, iters - products, tol, damping, x0, overlap, reorthogonalize=reorthogonalize
        )
        before = steps  # the iterations of the earlier restarts
        products, steps, x0 = products + result.products, steps + result.iters, None
        if not result.negative_curvature or products >= iters:
            break
        damping *= growth
    result.products, result.iters = products, steps
    result.iterate = None if result.iterate is None else result.iterate + before
    return result, damping
