"""Conjugate gradient for ``(A + λI) x = v`` with ``A`` symmetric, on tuples of tensors.

One algorithm, two loops: the host loop reads pᵀAp and ‖r‖ after each iteration and stops
early (``sync=True``); the device loop (``sync=False``, for compiled code) never reads
them: an iteration that starts converged, or meets pᵀAp ≤ 0, takes a zero step instead, so
its iterate is the host loop's up to rounding and it always makes ``iters`` products.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import axpy, dot, norm, zeros_like
from ..typing import MatVec, Tensors
from .result import SolveResult

__all__ = ["NEGATIVE_CURVATURE", "conjugate_gradient", "conjugate_gradient_report", "damped"]

NEGATIVE_CURVATURE = (
    "the conjugate-gradient solve met negative curvature (pᵀHp ≤ 0): the inner Hessian is not "
    "positive definite at params (not a minimum, or a non-convex inner problem). The result used "
    "the iterate before it; add damping, or use implicit-neumann"
)

_State = tuple[Tensors, Tensors, Tensors, Tensor]  # x, r, p, ‖r‖²


def damped(matvec: MatVec, damping: float) -> MatVec:
    """``p ↦ (A + damping·I) p``."""
    if not damping:
        return matvec
    return lambda p: axpy(damping, p, matvec(p))


def conjugate_gradient(
    matvec: MatVec,
    v: Tensors,
    iters: int,
    tol: float = 1e-10,
    damping: float = 0.0,
    x0: Tensors | None = None,
    overlap: bool | None = None,
    sync: bool = True,
) -> SolveResult:
    """Conjugate gradient for ``(A + damping·I) x = v`` with ``A`` symmetric.

    Stops after ``iters`` iterations or when ‖r‖ ≤ tol·‖v‖. On negative or zero curvature
    (pᵀAp ≤ 0: ``A`` is not positive definite along p) it stops, keeps the last iterate and
    reports the breakdown ``"negative_curvature"``. The host reads pᵀAp and ‖r‖ once per
    iteration; with ``overlap`` (default: when ``v`` is on a GPU) it reads them while the
    next iteration is already queued on the device, which then never idles waiting for the
    host; a solve that stops early spends one more product there (counted in ``products``),
    and the iterate is the same.

    ``sync=False``: no host synchronisation at all (for compiled code); always ``iters``
    products (one more with ``x0``), diagnostics in ``info`` as 0-dim tensors (``residual``,
    ``iters``, ``negative_curvature``), read by :func:`conjugate_gradient_report`.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    apply = damped(matvec, damping)
    x, r = (zeros_like(v), v) if x0 is None else (x0, axpy(-1.0, apply(x0), v))
    start = int(x0 is not None)  # the product that made the initial residual
    if not sync:
        return _device_loop(apply, v, x, r, iters, tol, start)
    return _host_loop(apply, v, x, r, iters, tol, start, v[0].is_cuda if overlap is None else overlap)


def _iteration(apply: MatVec, state: _State) -> tuple[_State, Tensor]:
    """One CG iteration and its curvature pᵀAp (no host read)."""
    x, r, p, rs = state
    ap = apply(p)
    curvature = dot(p, ap)
    step = rs / curvature
    x, r = axpy(step, p, x), axpy(-step, ap, r)
    rs_next = dot(r, r)
    return (x, r, axpy(rs_next / rs, p, r), rs_next), curvature


def _host_loop(
    apply: MatVec, v: Tensors, x: Tensors, r: Tensors, iters: int, tol: float, products: int, overlap: bool
) -> SolveResult:
    rs = dot(r, r)
    v_norm, rs_host = torch.stack((norm(v), rs)).tolist()
    if v_norm == 0.0:
        return SolveResult(x=zeros_like(v), products=products, iters=0, residual=0.0, converged=True)
    residual = math.sqrt(rs_host) / v_norm
    state: _State = (x, r, r, rs)
    queued: tuple[_State, _HostRead] | None = None
    negative, k, offset = False, 0, products

    def launch(current: _State) -> tuple[_State, _HostRead]:
        following, curvature = _iteration(apply, current)
        return following, _HostRead(torch.stack((curvature, following[3])))

    while k < iters and residual > tol:
        if queued is None:
            queued = launch(state)
            products += 1
        following, flags = queued
        queued = None
        if overlap and k + 1 < iters:  # queue the next iteration before reading this one
            queued = launch(following)
            products += 1
        curvature, rs_host = flags.read()
        k += 1
        if not math.isfinite(curvature):
            raise NonFiniteError(
                f"non-finite values in Hessian-vector product {k + offset} of the conjugate-gradient solve"
            )
        if curvature <= 0.0:  # this iteration's step is discarded: keep the last iterate
            negative = True
            break
        state, residual = following, math.sqrt(rs_host) / v_norm
    return _result(state[0], products, k, residual, tol, negative)


def _result(
    x: Tensors, products: int, iters: int, residual: float, tol: float, negative: bool
) -> SolveResult:
    return SolveResult(
        x=x,
        products=products,
        iters=iters,
        residual=residual,
        converged=residual <= max(tol, 1e-12) and not negative,
        breakdown="negative_curvature" if negative else None,
        message=NEGATIVE_CURVATURE if negative else "",
    )


def _device_loop(
    apply: MatVec, v: Tensors, x: Tensors, r: Tensors, iters: int, tol: float, products: int
) -> SolveResult:
    v_norm = norm(v)
    v_scale = torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
    p, rs = r, dot(r, r)
    active = rs.sqrt() / v_scale > tol
    negative = torch.zeros_like(active)
    moved = torch.zeros((), dtype=torch.int64, device=v_norm.device)
    one = torch.ones_like(rs)
    for _ in range(iters):
        ap = apply(p)
        curvature = dot(p, ap)
        moved = moved + active.long()
        bent = active & (curvature <= 0)
        negative = negative | bent
        active = active & ~bent
        step = torch.where(active, rs / torch.where(active, curvature, one), torch.zeros_like(rs))
        x, r = axpy(step, p, x), axpy(-step, ap, r)
        rs_new = torch.where(active, dot(r, r), rs)
        beta = torch.where(active, rs_new / torch.where(active, rs, one), one)
        p = tuple(torch.where(active, ri + beta * pi, pi) for ri, pi in zip(r, p))
        rs = rs_new
        active = active & (rs.sqrt() / v_scale > tol)
    info = {"residual": rs.sqrt() / v_scale, "iters": moved, "negative_curvature": negative}
    return SolveResult(x=x, products=products + iters, iters=iters, info=info)


def conjugate_gradient_report(result: SolveResult, tol: float) -> SolveResult:
    """The host numbers of a ``sync=False`` solve (one read of its ``info``)."""
    residual, iters, negative = (
        float(result.info["residual"]),
        int(result.info["iters"]),
        bool(result.info["negative_curvature"]),
    )
    return _result(result.x, result.products, iters, residual, tol, negative)


class _HostRead:
    """A small device tensor on its way to the host: the copy is queued without waiting
    (pinned memory, ``non_blocking``), and :meth:`read` waits for it alone, not for the
    work queued after it."""

    def __init__(self, values: Tensor) -> None:
        self.event = None
        if values.is_cuda:
            stream = torch.cuda.current_stream(values.device)
            values = values.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        self.values = values

    def read(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.values.tolist()
