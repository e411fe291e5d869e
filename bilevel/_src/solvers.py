"""Linear solvers for ``A x = v`` on tuples of tensors, given only products with ``A``.

Pure functions: ``matvec`` maps a tuple of tensors to a tuple of the same shapes; nothing
here knows about losses or models. In the implicit modes ``A`` is the inner Hessian ``H``
(or the transposed Jacobian ``Jᵀ`` of a non-gradient stationarity field).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import NonFiniteError
from .tree_math import axpy, dot, flat, leaf_norms, norm, scale, unflat
from .typing import MatVec, Tensors



@dataclass
class SolveResult:
    """``x`` ≈ A⁻¹v and what it took.

    ``residual`` is ‖v − A x‖ / ‖v‖ where the solver knows it (None otherwise);
    ``products`` counts products with ``A``.
    """

    x: Tensors
    products: int
    iters: int
    residual: float | None = None
    converged: bool | None = True
    negative_curvature: bool = False
    diverged: bool = False
    singular: bool = False


# ---------------------------------------------------------------------- solvers
def neumann_series(matvec: MatVec, v: Tensors, iters: int, alpha: float | Tensor,
                   residual: bool = True) -> tuple[Tensors, Tensor]:
    """The series ``x = α Σ_{j<K} (I − αA)ʲ v`` (``K = iters``) and the norms ‖(I − αA)ʲ v‖.

    Pure and free of host synchronisation (``alpha`` may be a tensor), so it can be
    compiled; :func:`neumann` adds the checks. Returns ``(x, norms)`` with ``norms[j]`` for
    ``j = 0 … K`` (``K + 1`` entries, ``K`` products), or ``j < K`` with ``residual=False``
    (``K − 1`` products).
    """
    # per term only the leaves' norms (one fused call); they are combined at the end
    term, total = v, v
    norms = [leaf_norms(v)]
    for j in range(1, iters + 1 if residual else iters):
        term = axpy(-alpha, matvec(term), term)
        norms.append(leaf_norms(term))
        if j < iters:
            total = axpy(1.0, term, total)
    table = torch.stack([n for row in norms for n in row]).reshape(len(norms), -1)
    return scale(alpha, total), torch.linalg.vector_norm(table, dim=1)


def neumann(matvec: MatVec, v: Tensors, iters: int, alpha: float, residual: bool = True) -> SolveResult:
    """Truncated Neumann series ``x = α Σ_{j<K} (I − αA)ʲ v`` with ``K = iters`` terms.

    Uses ``K`` products: ``K − 1`` for the terms and one more for the exact residual
    ``v − A x = (I − αA)ᴷ v``. With ``residual=False`` it skips that product (``K − 1``
    products) and reports no residual; divergence is then judged on the last term
    ``(I − αA)ᴷ⁻¹ v``, the residual of the first ``K − 1`` terms. Converges for any ``A``
    (symmetric or not) whose spectrum lies in the disc |1 − αλ| < 1, e.g. SPD ``A`` with
    ``α < 2/λmax``. ``diverged`` is set when the judged norm grew above ‖v‖, or to twice the
    smallest norm of the series (for SPD ``A`` with ``α < 2/λmax`` the terms never grow).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    x, norms = neumann_series(matvec, v, iters, alpha, residual)
    return neumann_report(x, norms, iters, float(alpha), residual)


def neumann_report(x: Tensors, norms: Tensor, iters: int, alpha: float, residual: bool = True) -> SolveResult:
    """:func:`neumann`'s result from :func:`neumann_series`' output (one host synchronisation):
    raises on non-finite terms, flags divergence."""
    norms_host = norms.tolist()
    v_norm, norms_host = norms_host[0], norms_host[1:]
    for j, value in enumerate(norms_host, start=1):
        if not math.isfinite(value):
            raise NonFiniteError(f"non-finite values in term {j} of the Neumann series (product {j}); "
                                 f"alpha={alpha:g} may be above 2/λmax: lower it or use alpha='auto'")
    if not norms_host:  # one term and no residual: x = αv, nothing to judge
        return SolveResult(x=x, products=0, iters=iters, converged=None)
    last = norms_host[-1] / v_norm if v_norm > 0 else 0.0
    best = min(norms_host) / v_norm if v_norm > 0 else 0.0
    # for SPD A with α < 2/λmax the terms (I − αA)ʲ v never grow; growth to twice the best
    # value (above rounding) means some |1 − αλ| > 1, even before it exceeds ‖v‖
    growing = last > 2.0 * best and last > torch.finfo(norms.dtype).eps ** 0.5
    diverged = last > 1.0 or growing
    if not residual:
        return SolveResult(x=x, products=iters - 1, iters=iters, converged=False if diverged else None,
                           diverged=diverged)
    return SolveResult(x=x, products=iters, iters=iters, residual=last,
                       converged=last < 1.0 and not diverged, diverged=diverged)


def damped(matvec: MatVec, damping: float) -> MatVec:
    """``p ↦ (A + damping·I) p``."""
    if not damping:
        return matvec
    return lambda p: axpy(damping, p, matvec(p))


def conjugate_gradient(matvec: MatVec, v: Tensors, iters: int, tol: float = 1e-10, damping: float = 0.0,
                       x0: Tensors | None = None, overlap: bool | None = None) -> SolveResult:
    """Conjugate gradient for ``(A + damping·I) x = v`` with ``A`` symmetric.

    Stops after ``iters`` iterations or when ‖r‖ ≤ tol·‖v‖. On negative or zero curvature
    (pᵀAp ≤ 0: ``A`` is not positive definite along p) it stops, keeps the last iterate and
    sets ``negative_curvature``. The host reads pᵀAp and ‖r‖ once per iteration. With
    ``overlap`` (default: when ``v`` is on a GPU) it reads them while the next iteration is
    already queued on the device, which then never idles waiting for the host; a solve that
    stops early spends one more product there (counted in ``products``), and the iterate is
    the same.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    overlap = v[0].is_cuda if overlap is None else overlap

    apply = damped(matvec, damping)
    products = 0
    if x0 is None:
        x, r = tuple(torch.zeros_like(t) for t in v), v
    else:
        x = x0
        r = axpy(-1.0, apply(x0), v)
        products += 1
    rs = dot(r, r)
    v_norm, rs_host = torch.stack((norm(v), rs)).tolist()
    if v_norm == 0.0:
        return SolveResult(x=tuple(torch.zeros_like(t) for t in v), products=products, iters=0, residual=0.0)
    residual = math.sqrt(rs_host) / v_norm

    def iteration(state: tuple) -> tuple[tuple, _HostRead]:
        x, r, p, rs = state
        ap = apply(p)
        curvature = dot(p, ap)
        step = rs / curvature
        x, r = axpy(step, p, x), axpy(-step, ap, r)
        rs_next = dot(r, r)
        return (x, r, axpy(rs_next / rs, p, r), rs_next), _HostRead(torch.stack((curvature, rs_next)))

    state, queued, negative, k = (x, r, r, rs), None, False, 0
    while k < iters and residual > tol:
        if queued is None:
            queued = iteration(state)
            products += 1
        following, flags = queued
        queued = None
        if overlap and k + 1 < iters:  # queue the next iteration before reading this one
            queued = iteration(following)
            products += 1
        curvature, rs_host = flags.read()
        k += 1
        if not math.isfinite(curvature):
            raise NonFiniteError(f"non-finite values in Hessian-vector product {k + int(x0 is not None)} "
                                 "of the conjugate-gradient solve")
        if curvature <= 0.0:  # this iteration's step is discarded: keep the last iterate
            negative = True
            break
        state, residual = following, math.sqrt(rs_host) / v_norm
    return SolveResult(x=state[0], products=products, iters=k, residual=residual,
                       converged=residual <= max(tol, 1e-12) and not negative, negative_curvature=negative)


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


def conjugate_gradient_fixed(matvec: MatVec, v: Tensors, iters: int, tol: float = 1e-10,
                             damping: float = 0.0, x0: Tensors | None = None) -> tuple[Tensors, dict[str, Tensor]]:
    """:func:`conjugate_gradient` without host synchronisation, for compiled code.

    Always makes ``iters`` products (one more with ``x0``). Instead of leaving the loop, an
    iteration that starts converged (‖r‖ ≤ tol·‖v‖) or meets pᵀAp ≤ 0 takes a zero step, so
    the iterate is the one :func:`conjugate_gradient` returns (equal up to rounding).
    Returns ``(x, info)``; ``info`` holds 0-dim tensors ``residual``, ``iters`` (the
    iterations that moved, counted as :func:`conjugate_gradient` counts them) and
    ``negative_curvature``.
    """

    apply = damped(matvec, damping)
    v_norm = norm(v)
    v_scale = torch.where(v_norm > 0, v_norm, torch.ones_like(v_norm))
    if x0 is None:
        x, r = tuple(torch.zeros_like(t) for t in v), v
    else:
        x, r = x0, axpy(-1.0, apply(x0), v)
    p, rs = r, dot(r, r)
    active = rs.sqrt() / v_scale > tol
    negative = torch.zeros_like(active)
    moved = torch.zeros((), dtype=torch.int64, device=v_norm.device)
    for _ in range(iters):
        ap = apply(p)
        curvature = dot(p, ap)
        moved = moved + active.long()
        bent = active & (curvature <= 0)
        negative = negative | bent
        active = active & ~bent
        step = torch.where(active, rs / torch.where(active, curvature, torch.ones_like(curvature)),
                           torch.zeros_like(rs))
        x = axpy(step, p, x)
        r = axpy(-step, ap, r)
        rs_new = torch.where(active, dot(r, r), rs)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), torch.ones_like(rs))
        p = tuple(torch.where(active, ri + beta * pi, pi) for ri, pi in zip(r, p))
        rs = rs_new
        active = active & (rs.sqrt() / v_scale > tol)
    return x, {"residual": rs.sqrt() / v_scale, "iters": moved, "negative_curvature": negative}


def gmres(matvec: MatVec, v: Tensors, iters: int, tol: float = 1e-10) -> SolveResult:
    """GMRES for ``A x = v`` with any (non-symmetric) invertible ``A``, without restarts.

    Builds an orthonormal Krylov basis of ``span{v, Av, …}`` (modified Gram–Schmidt) and takes
    the ``x`` in it that minimises ‖v − A x‖, keeping the small least-squares problem
    triangular with Givens rotations (on the host, so results are bit-reproducible). Stops
    after ``iters`` products or when the relative residual is below ``tol``. Keeps ``iters``
    vectors of size P.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    b = flat(v)
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return SolveResult(x=tuple(torch.zeros_like(t) for t in v), products=0, iters=0, residual=0.0)
    basis = [b / b_norm]
    triangle: list[list[float]] = []  # columns of R
    rotations: list[tuple[float, float]] = []
    rhs = [b_norm]
    residual, k = 1.0, 0
    while k < iters:
        w = flat(matvec(unflat(basis[k], v)))
        w_norm = float(w.norm())
        column = []
        for q in basis:
            h = float(w @ q)
            w = w - h * q
            column.append(h)
        below = float(w.norm())
        for j, (c, s) in enumerate(rotations):  # bring the new column into triangular form
            column[j], column[j + 1] = c * column[j] + s * column[j + 1], -s * column[j] + c * column[j + 1]
        radius = math.hypot(column[k], below)
        if not math.isfinite(radius):
            raise NonFiniteError(f"non-finite values in product {k + 1} of the GMRES solve")
        c, s = (column[k] / radius, below / radius) if radius > 0 else (1.0, 0.0)
        column[k] = radius
        rotations.append((c, s))
        rhs.append(-s * rhs[k])
        rhs[k] = c * rhs[k]
        triangle.append(column)
        k += 1
        residual = abs(rhs[k]) / b_norm
        if residual <= tol or below <= 1e3 * torch.finfo(b.dtype).eps * w_norm:
            break  # converged, or the Krylov space is invariant (A q_k lies in it): x is exact
        basis.append(w / below)
    y = [0.0] * k
    for i in reversed(range(k)):  # back substitution with R (column-stored)
        y[i] = (rhs[i] - sum(triangle[j][i] * y[j] for j in range(i + 1, k))) / triangle[i][i]
    x = torch.stack(basis[:k], dim=1) @ torch.tensor(y, dtype=b.dtype, device=b.device)
    return SolveResult(x=unflat(x, v), products=k, iters=k, residual=residual,
                       converged=residual <= max(tol, 1e-12))


def power_iteration(matvec: MatVec, like: Tensors, iters: int = 10,
                    generator: torch.Generator | None = None) -> float:
    """Estimate the largest |eigenvalue| of ``A`` by ``iters`` products from a random start."""
    value = float(power_iteration_estimate(matvec, random_start(like, generator), iters))
    if not math.isfinite(value):
        raise NonFiniteError("non-finite values in the power iteration that estimates the largest "
                             "curvature for alpha='auto'")
    return value


def random_start(like: Tensors, generator: torch.Generator | None = None) -> Tensors:
    """A random unit vector shaped like ``like``, drawn on the CPU (reproducible on any device)."""
    u = tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)
              for t in like)
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


def nystrom(columns: Tensor, indices: Tensor, v: Tensors, rho: float) -> SolveResult:
    """Nyström-approximated solve ``(C M⁺ Cᵀ + ρI)⁻¹ v`` by the Woodbury identity.

    ``columns`` is ``C = A[:, S]`` as a ``(k, P)`` batch (row ``i`` is ``A e_{S_i}``) and
    ``indices`` the index set ``S``; ``M = A[S, S]``. With the thin QR ``C = QR`` and
    ``B = R M⁺ Rᵀ``, the solution is ``(v − QQᵀv)/ρ + Q (B + ρI)⁻¹ Qᵀv``, which avoids the
    cancellation of the textbook form for small ρ. ``M⁺`` drops eigenvalues below machine
    precision (``singular`` is then set). With ``S`` all indices this is ``(A + ρI)⁻¹ v``.
    The caller counts the ``k`` products.
    """
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    vf = flat(v)
    c = columns.T  # (P, k)
    if not bool(torch.isfinite(c).all()):
        raise NonFiniteError("non-finite values in the Hessian columns of the Nyström solve")
    m = c[indices]  # (k, k) = A[S, S]
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (m + m.T))
    cutoff = eigvals.abs().max() * m.shape[0] * torch.finfo(m.dtype).eps
    keep = eigvals.abs() > cutoff
    singular = bool((~keep).any())
    inverse = torch.where(keep, 1.0 / torch.where(keep, eigvals, torch.ones_like(eigvals)),
                          torch.zeros_like(eigvals))
    q, r = torch.linalg.qr(c)
    rv = r @ eigvecs
    b = (rv * inverse) @ rv.T
    qtv = q.T @ vf
    eye = torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
    inner, info = torch.linalg.solve_ex(0.5 * (b + b.T) + rho * eye, qtv)
    singular = singular or bool(info != 0)
    x = q @ inner
    if c.shape[1] < c.shape[0]:  # the part of v outside the sampled columns' span; none at full rank
        x = x + (vf - q @ qtv) / rho
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("non-finite values in the Nyström solve: its core matrix is singular; "
                             "raise rho")
    return SolveResult(x=unflat(x, v), products=0, iters=1, singular=singular)


def dense_solve(matrix: Tensor, v: Tensors) -> SolveResult:
    """Solve ``A x = v`` with ``A`` given densely as a ``(P, P)`` matrix.

    Sets ``singular`` (and returns the least-squares solution) when ``A`` is numerically
    singular: the LU factorisation fails, its residual is above rounding, or the solution
    shows a condition number above ``1 / (P ε)`` (numpy's rank tolerance): ``cond(A) ≥
    max|aᵢⱼ| ‖x‖ / ‖v‖``, so a solution blown up by a near-zero eigenvalue is caught.
    """
    vf = flat(v)
    if not bool(torch.isfinite(matrix).all()):
        raise NonFiniteError("non-finite values in the dense Hessian")
    if not bool(torch.isfinite(vf).all()):
        raise NonFiniteError("non-finite values in the right-hand side ∂g/∂θ of the dense solve")
    solution, info = torch.linalg.solve_ex(matrix, vf)
    r = vf - matrix @ solution
    v_norm, x_norm, a_max = float(vf.norm()), float(solution.norm()), float(matrix.abs().max())
    eps, size = torch.finfo(matrix.dtype).eps, matrix.shape[0]
    singular = (bool(info != 0) or not float(r.norm()) <= 1e3 * eps * size * (a_max * x_norm + v_norm)
                or not a_max * x_norm <= v_norm / (size * eps))
    if singular:
        solution = torch.linalg.lstsq(matrix.cpu(), vf.cpu().unsqueeze(-1)).solution.squeeze(-1).to(vf.device)
        r = vf - matrix @ solution
    residual = float(r.norm()) / v_norm if v_norm > 0 else 0.0
    return SolveResult(x=unflat(solution, v), products=0, iters=1, residual=residual,
                       converged=not singular, singular=singular)
