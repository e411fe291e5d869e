"""MINRES (Paige and Saunders, 1975) for ``(A + λI) x = v`` with ``A`` symmetric, possibly
indefinite or singular, on tuples of tensors.

The Lanczos process builds an orthonormal basis of the Krylov space ``K_k = span{r₀, A r₀, …}``
and the tridiagonal ``T_k``; ``x_k`` minimises ‖v − (A + λI) x‖ over ``x₀ + K_k``, through a QR
factorisation of ``T_k`` updated by one Givens rotation per product. Five vectors of size P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import axpy, dot, norm, scale, zeros_like
from ..typing import MatVec, Tensors
from .cg import damped
from .result import SolveResult, true_residual

__all__ = ["MINRES_SINGULAR", "minres", "negative_curvature"]

MINRES_SINGULAR = (
    "the MINRES solve found the inner Hessian (plus damping) singular with ∂g/∂θ partly in its "
    "null space: no x solves the system, and the result is a least-squares solution (its "
    "residual is that null-space part). The hypergradient is not determined there; add damping "
    "(damping > 0 makes the system solvable), or check that params is a minimum"
)
MINRES_UNTRUSTED = (
    "the MINRES recurrence lost its accuracy (the inner Hessian plus damping is singular or "
    "numerically so): its iterate's true residual exceeded the start's, so the start is "
    "returned. Add damping (damping > 0 makes the system solvable), or check that params is a minimum"
)


@dataclass
class _Rotations:
    """The two latest Givens rotations of the QR factorisation of ``T_k`` (host floats) and
    the rotated right-hand side ``η``, whose magnitude is the residual norm of ``x_k``."""

    eta: float
    c_old: float = 1.0
    s_old: float = 0.0
    c: float = 1.0
    s: float = 0.0

    def column(self, beta: float, alpha: float) -> tuple[float, float, float]:
        """Apply the two previous rotations to the column (β_k, α_k) of ``T_k``: returns the
        entries ε (two rows up) and δ (one up) of ``R`` and the unrotated diagonal γ̄."""
        epsilon, below = self.s_old * beta, self.c_old * beta
        return epsilon, self.c * below + self.s * alpha, -self.s * below + self.c * alpha

    def rotate(self, gamma_bar: float, beta_next: float, gamma: float) -> float:
        """The rotation that zeroes β_{k+1} below the diagonal; returns the step along ``w_k``."""
        c, s = gamma_bar / gamma, beta_next / gamma
        self.c_old, self.s_old, self.c, self.s = self.c, self.s, c, s
        step = c * self.eta
        self.eta = -s * self.eta
        return step


def minres(
    matvec: MatVec,
    v: Tensors,
    iters: int,
    tol: float = 1e-10,
    damping: float = 0.0,
    x0: Tensors | None = None,
) -> SolveResult:
    """MINRES for ``(A + damping·I) x = v`` with ``A`` symmetric (no definiteness needed).

    Returns the ``x`` in ``x₀ + K_k`` with the smallest residual. On a nonsingular system
    (definite or indefinite) it converges to the solution. On a singular one with ``v`` in
    the range (compatible) and ``x₀ = 0`` the iterates stay in the range, so the limit is
    the minimum-norm solution ``A⁺v``; when ``v`` has a null-space part ``v_N`` no ``x``
    solves the system: the Krylov space then becomes invariant with a singular ``T_k``, the
    solve stops at a least-squares solution (residual ‖v_N‖), removes its component along
    the residual ``v_N`` (the only null-space direction in ``K_k``), returns the minimum-norm
    least-squares solution ``A⁺v`` and sets the breakdown ``"singular"``.

    Stops after ``iters`` products, when the recurrence's residual is at most ``tol·‖v‖``, or
    when the Krylov space is invariant. One more product then measures the true residual
    ‖v − (A + λI) x‖/‖v‖, which is what ``residual`` and ``converged`` report (one more with
    ``x0``, for its initial residual; one more on a singular stop, after the projection). The
    host reads two numbers per product.

    The singular stop is the least-squares test of Paige and Saunders: ‖A r_k‖, read off the QR
    recurrence, at most ``tol·‖A‖·‖r_k‖`` while ‖r_k‖ > ``tol·‖v‖``; in floating point the
    Krylov space is only numerically invariant, so the solve also stops (one step back) once
    ‖A r_k‖/‖r_k‖ is below ``√eps·‖A‖`` and stops falling, rather than divide by rounding
    pivots. An iterate whose measured residual exceeds the start's (rounding broke the
    recurrence on a numerically singular system) is never returned: the start is, flagged
    ``"singular"``, with ``iterate=0``.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    apply = damped(matvec, damping)
    x, r = (zeros_like(v), v) if x0 is None else (x0, axpy(-1.0, apply(x0), v))
    v_norm, beta = torch.stack((norm(v), norm(r))).tolist()
    if v_norm == 0.0:
        return SolveResult(x=zeros_like(v), products=0, iters=0, residual=0.0, converged=True)
    products = int(x0 is not None)
    if beta <= tol * v_norm:  # the start solves the system (its residual is measured)
        return SolveResult(x=x, products=products, iters=0, residual=beta / v_norm, converged=True)
    eps = torch.finfo(v[0].dtype).eps
    beta_first = beta
    rotations = _Rotations(eta=beta)
    q_prev, q = zeros_like(v), scale(1.0 / beta, r)
    w_old, w = zeros_like(v), zeros_like(v)
    a_norm, singular, k = 0.0, False, 0
    least_squares_before, step = math.inf, 0.0  # ‖A r_{k−2}‖/‖r_{k−2}‖, the step to x_{k−1}
    lanczos: list[tuple[float, float]] = []  # (α_k, β_{k+1}): the tridiagonal T_k
    while k < iters:
        p = apply(q)
        k += 1
        alpha = dot(q, p)
        p = axpy(-beta, q_prev, axpy(-alpha, q, p))
        alpha_host, beta_next = _read(alpha, norm(p), k + products)
        lanczos.append((alpha_host, beta_next))
        # ‖A‖ ≥ the norm of column k of T_k (β₁ = ‖r₀‖ is the start's, not an entry of T_k)
        column_norm = math.sqrt(alpha_host**2 + (beta**2 if k > 1 else 0.0) + beta_next**2)
        a_norm = max(a_norm, column_norm)
        floor = 100.0 * eps * a_norm  # below it a number is rounding: an invariant space, or a zero pivot
        epsilon, delta, gamma_bar = rotations.column(beta, alpha_host)
        # ‖A r_{k−1}‖ = |η_{k−1}|·‖(γ̄_k, c_{k−1}β_{k+1})‖ (Paige and Saunders), so x_{k−1} is a
        # least-squares solution (‖r‖ > tol·‖v‖ here: v has a null-space part) when ‖A r‖ ≤
        # tol·‖A‖·‖r‖. Below √eps·‖A‖·‖r‖ the Krylov space is numerically invariant and the
        # next pivots are rounding (x would grow without bound): when ‖A r‖/‖r‖ stops falling
        # there, the step to x_{k−1} is undone and x_{k−2} is the least-squares solution
        least_squares = math.hypot(gamma_bar, rotations.c * beta_next)
        stalled = least_squares_before <= math.sqrt(eps) * a_norm and least_squares >= least_squares_before
        least_squares_before = least_squares
        gamma = math.hypot(gamma_bar, beta_next)
        if least_squares <= tol * a_norm or stalled or gamma <= floor:
            singular = True
            if stalled:
                x = axpy(-step, w, x)
            break
        # w_k = (q_k − δ w_{k−1} − ε w_{k−2}) / γ: the columns of V_k R_k⁻¹
        w_old, w = w, scale(1.0 / gamma, axpy(-epsilon, w_old, axpy(-delta, w, q)))
        step = rotations.rotate(gamma_bar, beta_next, gamma)
        x = axpy(step, w, x)
        if abs(rotations.eta) <= tol * v_norm or beta_next <= floor:
            break
        q_prev, q, beta = q, scale(1.0 / beta_next, p), beta_next
    result = _measured(apply, v, x, products + k, k, tol, singular)
    result = _no_worse_than_start(result, zeros_like(v) if x0 is None else x0, beta_first / v_norm)
    result.info.update(negative_curvature(lanczos, beta_first))
    return result


def _read(alpha: Tensor, beta: Tensor, product: int) -> tuple[float, float]:
    """α_k and β_{k+1} on the host (one read), checked."""
    alpha_host, beta_host = torch.stack((alpha, beta)).tolist()
    if not (math.isfinite(alpha_host) and math.isfinite(beta_host)):
        raise NonFiniteError(f"non-finite values in Hessian-vector product {product} of the MINRES solve")
    return alpha_host, beta_host


def _no_worse_than_start(result: SolveResult, start: Tensors, start_residual: float) -> SolveResult:
    """``result``, or the start where its measured residual is larger (rounding broke the
    recurrence on a numerically singular system), flagged."""
    if result.residual is None or result.residual <= start_residual:
        return result
    return SolveResult(
        x=start,
        products=result.products,
        iters=result.iters,
        residual=start_residual,
        converged=False,
        breakdown="singular",
        message=MINRES_UNTRUSTED,
        iterate=0,
    )


def negative_curvature(lanczos: list[tuple[float, float]], beta: float) -> dict[str, Tensor]:
    """How much of the Krylov part of x lies along negative curvature, from the Lanczos
    tridiagonal alone (host numbers, no product): with ``x − x₀ = Q_k y``, ``y`` the
    least-squares solution of ``T̄_k y = β e₁`` and ``T_k = S diag(θ) Sᵀ``, the share is
    ``Σ_{θᵢ<0} (Sᵀy)ᵢ² / ‖y‖²`` and ``count`` the negative Ritz values θᵢ. Exact while the
    Lanczos vectors stay orthogonal; in floating point an estimate (repeated Ritz values)."""
    k = len(lanczos)
    if k == 0:
        return {}
    alphas = torch.tensor([a for a, _ in lanczos], dtype=torch.float64)
    betas = torch.tensor([b for _, b in lanczos], dtype=torch.float64)
    tridiagonal = torch.diag(alphas) + torch.diag(betas[:-1], 1) + torch.diag(betas[:-1], -1)
    extended = torch.cat([tridiagonal, torch.zeros(1, k, dtype=torch.float64)])
    extended[k, k - 1] = betas[-1]
    rhs = torch.zeros(k + 1, 1, dtype=torch.float64)
    rhs[0, 0] = beta
    y = torch.linalg.lstsq(extended, rhs).solution[:, 0]
    ritz, vectors = torch.linalg.eigh(tridiagonal)
    weights = (vectors.T @ y) ** 2
    total = float(weights.sum())
    share = float(weights[ritz < 0].sum()) / total if total > 0 else 0.0
    return {
        "negative_share": torch.tensor(share, dtype=torch.float64),
        "negative_ritz": torch.tensor(int((ritz < 0).sum())),
    }


def _measured(
    apply: MatVec,
    v: Tensors,
    x: Tensors,
    products: int,
    iters: int,
    tol: float,
    singular: bool,
) -> SolveResult:
    """The result with its true residual (one product): the recurrence's estimate drifts from
    it in finite precision, and ``converged`` must describe the ``x`` returned.

    On a singular stop the residual ``r`` is ``v``'s null-space part ``v_N``, and the only
    null-space part of ``x ∈ K_k`` is a multiple of it (``A^j v`` lies in the range for
    ``j ≥ 1``): subtracting the projection of ``x`` on ``r`` leaves the minimum-norm
    least-squares solution, with the same residual in exact arithmetic (measured again)."""
    r, residual = true_residual(apply, x, v, "the MINRES solve")
    if singular and residual > 0.0:  # and measure the residual of the x returned (one more product)
        x = axpy(-float(dot(x, r)) / float(dot(r, r)), r, x)
        products += 1
        _, residual = true_residual(apply, x, v, "the MINRES solve")
    return SolveResult(
        x=x,
        products=products + 1,
        iters=iters,
        residual=residual,
        converged=residual <= max(tol, 1e-12) and not singular,
        breakdown="singular" if singular else None,
        message=MINRES_SINGULAR if singular else "",
    )
