"""The direct solve of a dense ``(P, P)`` system."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import flat, unflat
from ..typing import Tensors
from .result import SolveResult

__all__ = ["SINGULAR", "dense_solve"]

SINGULAR = (
    "the linear system is numerically singular (a least-squares or pseudo-inverse solution "
    "was used); add damping/rho or check that params is a strict minimum"
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
