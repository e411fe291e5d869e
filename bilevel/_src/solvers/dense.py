"""Direct solves: a dense ``(P, P)`` system, and the Nyström low-rank approximation."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import flat, unflat
from ..typing import Tensors
from .result import SolveResult

__all__ = ["SINGULAR", "dense_solve", "nystrom"]

SINGULAR = (
    "the linear system is numerically singular (a least-squares or pseudo-inverse solution "
    "was used); add damping/rho or check that params is a strict minimum"
)


def nystrom(columns: Tensor, indices: Tensor, v: Tensors, rho: float) -> SolveResult:
    """Nyström-approximated solve ``(C M⁺ Cᵀ + ρI)⁻¹ v`` by the Woodbury identity.

    ``columns`` is ``C = A[:, S]`` as a ``(k, P)`` batch (row ``i`` is ``A e_{S_i}``) and
    ``indices`` the index set ``S``; ``M = A[S, S]``. With the thin QR ``C = QR`` and
    ``B = R M⁺ Rᵀ``, the solution is ``(v − QQᵀv)/ρ + Q (B + ρI)⁻¹ Qᵀv``, which avoids the
    cancellation of the textbook form for small ρ. ``M⁺`` drops eigenvalues below machine
    precision (the breakdown ``"singular"`` is then set). With ``S`` all indices this is
    ``(A + ρI)⁻¹ v``. ``products`` counts the ``k`` columns; ``converged`` means only that no
    pseudo-inverse was needed (the low rank is an approximation it cannot measure).
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
    inverse = torch.where(
        keep, 1.0 / torch.where(keep, eigvals, torch.ones_like(eigvals)), torch.zeros_like(eigvals)
    )
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
        raise NonFiniteError("non-finite values in the Nyström solve: its core matrix is singular; raise rho")
    return SolveResult(
        x=unflat(x, v),
        products=columns.shape[0],
        iters=1,
        converged=not singular,
        breakdown="singular" if singular else None,
        message=SINGULAR if singular else "",
    )


def dense_solve(matrix: Tensor, v: Tensors) -> SolveResult:
    """Solve ``A x = v`` with ``A`` given densely as a ``(P, P)`` matrix.

    Sets the breakdown ``"singular"`` (and returns the least-squares solution) when ``A`` is
    numerically singular: the LU factorisation fails, its residual is above rounding, or the
    solution shows a condition number above ``1 / (P ε)`` (numpy's rank tolerance):
    ``cond(A) ≥ max|aᵢⱼ| ‖x‖ / ‖v‖``, so a solution blown up by a near-zero eigenvalue is
    caught. ``products`` is 0: the caller counts those that built ``A``.
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
    singular = (
        bool(info != 0)
        or not float(r.norm()) <= 1e3 * eps * size * (a_max * x_norm + v_norm)
        or not a_max * x_norm <= v_norm / (size * eps)
    )
    if singular:
        solution = torch.linalg.lstsq(matrix.cpu(), vf.cpu().unsqueeze(-1)).solution.squeeze(-1).to(vf.device)
        r = vf - matrix @ solution
    residual = float(r.norm()) / v_norm if v_norm > 0 else 0.0
    return SolveResult(
        x=unflat(solution, v),
        products=0,
        iters=1,
        residual=residual,
        converged=not singular,
        breakdown="singular" if singular else None,
        message=SINGULAR if singular else "",
    )
