"""Conjugate gradient for ``(A + λI) x = v`` with ``A`` symmetric, on tuples of tensors.

One algorithm, two loops: the host loop reads pᵀAp and ‖r‖ after each iteration and stops
early (``sync=True``); the device loop (``sync=False``, for compiled code) never reads
them: an iteration that starts converged, or meets pᵀAp ≤ 0, takes a zero step instead, so
its iterate is the host loop's up to rounding and it always makes ``iters`` products. Both
return the same iterate: the last one, or the one with the smallest residual where the last
cannot be trusted (:func:`conjugate_gradient`). Re-orthogonalisation, the damping ramp and
the preconditioner read the host (or need its decisions) and exist on the host loop only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import axpy, dot, flat, norm, unflat, zeros_like
from ..typing import MatVec, Tensors
from .result import SolveResult, true_residual

__all__ = [
    "NEGATIVE_CURVATURE",
    "Precondition",
    "conjugate_gradient",
    "conjugate_gradient_report",
    "damped",
]

NEGATIVE_CURVATURE = (
    "the conjugate-gradient solve met negative curvature (pᵀHp ≤ 0): the inner Hessian is not "
    "positive definite at params (not a minimum, or a non-convex inner problem), where CG does "
    "not apply. The result is CG's iterate with the smallest residual (never above ‖∂g/∂θ‖), "
    "not the solution. For the undamped IFT answer of an indefinite Hessian use "
    "implicit-minres; for a bounded, damped answer add damping (damping='auto' raises it from "
    "1e-2·λmax until CG meets no negative curvature, and reports it in stats.extra['damping'])"
)

_CG = "the conjugate-gradient solve"
_State = tuple[Tensors, Tensors, Tensors, Tensor]  # x, r, p, rᵀz (z = M⁻¹r; ‖r‖² unpreconditioned)
_Project = Callable[[Tensors], Tensors]
#: ``r ↦ M⁻¹r`` for a symmetric positive definite preconditioner ``M``
Precondition = Callable[[Tensors], Tensors]


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
    reorthogonalize: bool = False,
    preconditioner: Precondition | None = None,
) -> SolveResult:
    """Conjugate gradient for ``(A + damping·I) x = v`` with ``A`` symmetric.

    Stops after ``iters`` iterations or when ‖r‖ ≤ tol·‖v‖. On negative or zero curvature
    (pᵀAp ≤ 0: ``A`` is not positive definite along p) it stops and reports the breakdown
    ``"negative_curvature"``. It returns the last iterate (for SPD ``A`` the one with the
    smallest error in the A-norm), unless the solve met negative curvature or the last
    residual exceeds ‖v‖ (near-zero curvature can blow an iterate up): then the iterate with
    the smallest residual, ``x = 0`` included, so the residual returned is never above ‖v‖;
    ``iterate`` says which one (0: the start). It costs one vector.

    The host reads pᵀAp and ‖r‖ once per iteration; with ``overlap`` (default: when ``v`` is
    on a GPU) it reads them while the next iteration is already queued on the device, which
    then never idles waiting for the host; a solve that stops early spends one more product
    there (counted in ``products``), and the iterate is the same.

    ``reorthogonalize``: keep the normalised residuals (``iters`` vectors of size P) and
    project each new residual against them. In exact arithmetic the residuals are orthogonal;
    in floating point they lose it as soon as an extreme eigenvalue has converged, and CG
    then spends products on directions it has already searched, which is most of its cost on
    ill-conditioned systems. One more product then measures the true residual, which
    ``residual`` and ``converged`` report.

    A solve that meets ``tol`` by its recurrence spends one more product on the true residual,
    and continues from ``x`` with it where rounding made the two differ (see
    :func:`_confirmed`): ``residual`` and ``converged`` describe the ``x`` returned.

    ``sync=False``: no host synchronisation at all (for compiled code); always ``iters``
    products, one more for the true residual (and one with ``x0``), diagnostics in ``info``
    as 0-dim tensors (``residual``, ``iters``, ``negative_curvature``), read by
    :func:`conjugate_gradient_report`; no ``reorthogonalize``.

    ``preconditioner``: ``r ↦ M⁻¹r`` for an SPD ``M ≈ A + damping·I`` (preconditioned CG:
    ``z = M⁻¹r``, ``α = rᵀz / pᵀAp``, ``β = r₊ᵀz₊ / rᵀz``, ``p = z₊ + βp``). The stopping test
    and ``residual`` stay on the unpreconditioned ‖r‖/‖v‖, so ``converged`` means the same;
    each iteration costs one more inner product. Host loop only, not with ``reorthogonalize``
    (its projections would need the M-inner product).
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if reorthogonalize and not sync:
        raise ValueError("reorthogonalize=True needs the host loop (sync=True)")
    if preconditioner is not None and (reorthogonalize or not sync):
        raise ValueError(
            "a preconditioner needs the host loop (sync=True) without reorthogonalize; "
            "pass sync=True and reorthogonalize=False with it"
        )
    apply = damped(matvec, damping)
    x, r = (zeros_like(v), v) if x0 is None else (x0, axpy(-1.0, apply(x0), v))
    start = int(x0 is not None)  # the product that made the initial residual
    if not sync:
        return _device_loop(apply, v, x, r, iters, tol, start)
    overlap = v[0].is_cuda if overlap is None else overlap
    basis_size = iters + 1 if reorthogonalize else 0
    result = _host_loop(apply, v, (x, r), iters, tol, start, overlap, basis_size, preconditioner)
    if reorthogonalize:
        return _measured(apply, v, result, tol)
    return _confirmed(apply, v, result, iters, tol, overlap, preconditioner)


def _confirmed(
    apply: MatVec,
    v: Tensors,
    result: SolveResult,
    iters: int,
    tol: float,
    overlap: bool,
    precondition: Precondition | None,
) -> SolveResult:
    """A claim of convergence checked against the true residual (one product). In finite
    precision the recurrence's residual drifts below the true one on ill-conditioned systems;
    where it did, CG restarts from ``x`` with the true residual (residual replacement) while
    the budget of ``iters`` iterations lasts, and a claim it cannot confirm is withdrawn."""
    while result.converged and result.iters > 0:  # iters 0: v = 0, or a start whose residual was measured
        r, true = true_residual(apply, result.x, v, _CG)
        result.products += 1
        left = iters - result.iters
        if true <= max(tol, 1e-12) or left <= 0:
            result.residual, result.converged = true, true <= max(tol, 1e-12)
            return result
        done = result.iters
        result = _host_loop(apply, v, (result.x, r), left, tol, result.products, overlap, 0, precondition)
        result.iters += done
        result.iterate = None if result.iterate is None else result.iterate + done
    return result


def _measured(apply: MatVec, v: Tensors, result: SolveResult, tol: float) -> SolveResult:
    """``result`` with its true residual (one product). The projections change the residual
    without changing ``x``: in low precision on ill-conditioned systems the recurrence's
    residual then falls far below the true one, which ``converged`` must describe."""
    if result.iters == 0:  # v = 0, or the start met tol: its residual came from a product
        return result
    _, residual = true_residual(apply, result.x, v, _CG)
    result.products, result.residual = result.products + 1, residual
    result.converged = residual <= max(tol, 1e-12) and not result.negative_curvature
    return result


def _iteration(
    apply: MatVec, state: _State, project: _Project | None = None, precondition: Precondition | None = None
) -> tuple[_State, Tensor, Tensor]:
    """One (preconditioned) CG iteration, its curvature pᵀAp and the new ‖r‖² (no host read)."""
    x, r, p, rz = state
    ap = apply(p)
    curvature = dot(p, ap)
    step = rz / curvature
    x, r = axpy(step, p, x), axpy(-step, ap, r)
    if project is not None:
        r = project(r)
    z = r if precondition is None else precondition(r)
    rz_next = dot(r, z)
    rs_next = rz_next if precondition is None else dot(r, r)
    return (x, r, axpy(rz_next / rz, p, z), rz_next), curvature, rs_next


def _first_state(x: Tensors, r: Tensors, rs: Tensor, precondition: Precondition | None) -> _State:
    """``(x, r, p = z, rᵀz)`` with ``z = M⁻¹r`` (``z = r``, ``rᵀz = ‖r‖²`` without ``M``)."""
    if precondition is None:
        return x, r, r, rs
    z = precondition(r)
    return x, r, z, dot(r, z)


class _Residuals:
    """The normalised residuals so far, the rows of a ``(k, P)`` matrix that grows by
    doubling up to ``capacity`` rows; :meth:`project` makes a new residual orthogonal to
    them (classical Gram–Schmidt: two matrix-vector products) and adds it."""

    def __init__(self, r: Tensors, rs: Tensor, capacity: int) -> None:
        first = flat(r)
        self.capacity = capacity
        self.rows = first.new_empty((min(capacity, 16), first.numel()))
        self.rows[0] = first / rs.sqrt().clamp_min(torch.finfo(first.dtype).tiny)
        self.count = 1

    def project(self, r: Tensors) -> Tensors:
        basis = self.rows[: self.count]
        f = flat(r)
        f = f - basis.T @ (basis @ f)
        if self.count == self.rows.shape[0]:
            grown = self.rows.new_empty((min(2 * self.count, self.capacity), f.numel()))
            grown[: self.count] = self.rows
            self.rows = grown
        if self.count < self.rows.shape[0]:  # the last residual of a full budget is not needed
            self.rows[self.count] = f / torch.linalg.vector_norm(f).clamp_min(torch.finfo(f.dtype).tiny)
            self.count += 1
        return unflat(f, r)


@dataclass
class _Best:
    """The iterate with the smallest residual so far and its iteration."""

    x: Tensors
    residual: float
    index: int = 0

    def offer(self, x: Tensors, residual: float, index: int) -> None:
        if residual < self.residual:
            self.x, self.residual, self.index = x, residual, index


def _host_loop(
    apply: MatVec,
    v: Tensors,
    start: tuple[Tensors, Tensors],
    iters: int,
    tol: float,
    products: int,
    overlap: bool,
    basis_size: int,
    precondition: Precondition | None = None,
) -> SolveResult:
    x, r = start
    rs = dot(r, r)
    v_norm, rs_host = torch.stack((norm(v), rs)).tolist()
    if v_norm == 0.0:
        return SolveResult(x=zeros_like(v), products=products, iters=0, residual=0.0, converged=True)
    residual = math.sqrt(rs_host) / v_norm
    best = _Best(x, residual) if residual <= 1.0 else _Best(zeros_like(v), 1.0)
    project = _Residuals(r, rs, basis_size).project if basis_size else None
    state = _first_state(x, r, rs, precondition)
    queued: tuple[_State, _HostRead] | None = None
    negative, k, offset = False, 0, products

    def launch(current: _State) -> tuple[_State, _HostRead]:
        following, curvature, rs_next = _iteration(apply, current, project, precondition)
        return following, _HostRead(torch.stack((curvature, rs_next)))

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
        if curvature <= 0.0:  # this iteration's step is discarded
            negative = True
            break
        state, residual = following, math.sqrt(rs_host) / v_norm
        best.offer(state[0], residual, k)
    if negative or residual > 1.0:  # the last iterate is not to be trusted: the best one
        return _result(best.x, products, k, best.residual, tol, negative, best.index)
    return _result(state[0], products, k, residual, tol, negative, k)


def _result(
    x: Tensors,
    products: int,
    iters: int,
    residual: float,
    tol: float,
    negative: bool,
    index: int | None = None,
) -> SolveResult:
    return SolveResult(
        x=x,
        products=products,
        iters=iters,
        residual=residual,
        converged=residual <= max(tol, 1e-12) and not negative,
        breakdown="negative_curvature" if negative else None,
        message=NEGATIVE_CURVATURE if negative else "",
        iterate=index,
    )


def _device_loop(
    apply: MatVec, v: Tensors, x: Tensors, r: Tensors, iters: int, tol: float, products: int
) -> SolveResult:
    v_norm = norm(v)
    v_scale = torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
    p, rs = r, dot(r, r)
    # the best iterate as in the host loop: the start, or zero where the start is worse
    best_rs = torch.minimum(rs, v_scale**2)
    best_x = tuple(torch.where(rs <= best_rs, t, torch.zeros_like(t)) for t in x)
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
        better = active & (rs_new < best_rs)
        best_x = tuple(torch.where(better, xi, bi) for xi, bi in zip(x, best_x))
        best_rs = torch.where(better, rs_new, best_rs)
        beta = torch.where(active, rs_new / torch.where(active, rs, one), one)
        p = tuple(torch.where(active, ri + beta * pi, pi) for ri, pi in zip(r, p))
        rs = rs_new
        active = active & (rs.sqrt() / v_scale > tol)
    use_best = negative | (rs > v_scale**2)
    x = tuple(torch.where(use_best, bi, xi) for xi, bi in zip(x, best_x))
    # the true residual of the x returned (one product): the recurrence's drifts below it
    residual = norm(axpy(-1.0, apply(x), v)) / v_scale
    info = {"residual": residual, "iters": moved, "negative_curvature": negative}
    return SolveResult(x=x, products=products + iters + 1, iters=iters, info=info)


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
