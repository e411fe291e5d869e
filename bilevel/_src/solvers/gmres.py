"""GMRES for ``A x = v`` with any invertible ``A`` (no symmetry needed), without restarts."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import flat, unflat, zeros_like
from ..typing import MatVec, Tensors
from .result import SolveResult, true_residual

__all__ = ["gmres"]


class _Arnoldi:
    """The Krylov basis and the QR factors of its small least-squares problem.

    The Hessenberg columns are kept triangular by Givens rotations as they arrive, so the
    residual of the best ``x`` in the basis is known after every product (``|rhs[k]|``).
    The small problem lives on the host, so results are bit-reproducible.
    """

    def __init__(self, b: Tensor) -> None:
        self.b_norm = float(b.norm())
        self.basis = [b / self.b_norm]
        self.triangle: list[list[float]] = []  # columns of R
        self.rotations: list[tuple[float, float]] = []
        self.rhs = [self.b_norm]

    def extend(self, w: Tensor) -> tuple[Tensor, float]:
        """Orthogonalise ``w = A q_k`` against the basis (modified Gram–Schmidt), add its
        column to the triangle; returns the remainder and its norm."""
        k = len(self.triangle)
        column = []
        for q in self.basis:
            h = float(w @ q)
            w = w - h * q
            column.append(h)
        below = float(w.norm())
        for j, (c, s) in enumerate(self.rotations):  # bring the new column into triangular form
            column[j], column[j + 1] = c * column[j] + s * column[j + 1], -s * column[j] + c * column[j + 1]
        radius = math.hypot(column[k], below)
        if not math.isfinite(radius):
            raise NonFiniteError(f"non-finite values in product {k + 1} of the GMRES solve")
        c, s = (column[k] / radius, below / radius) if radius > 0 else (1.0, 0.0)
        column[k] = radius
        self.rotations.append((c, s))
        self.rhs.append(-s * self.rhs[k])
        self.rhs[k] = c * self.rhs[k]
        self.triangle.append(column)
        return w, below

    def solution(self) -> Tensor:
        """``x`` in the basis minimising the residual: back substitution with R."""
        k = len(self.triangle)
        y = [0.0] * k
        for i in reversed(range(k)):
            y[i] = (self.rhs[i] - sum(self.triangle[j][i] * y[j] for j in range(i + 1, k))) / self.triangle[
                i
            ][i]
        q = self.basis[0]
        return torch.stack(self.basis[:k], dim=1) @ torch.tensor(y, dtype=q.dtype, device=q.device)


def gmres(matvec: MatVec, v: Tensors, iters: int, tol: float = 1e-10) -> SolveResult:
    """GMRES for ``A x = v`` with any (non-symmetric) invertible ``A``, without restarts.

    Builds an orthonormal Krylov basis of ``span{v, Av, …}`` (modified Gram–Schmidt) and takes
    the ``x`` in it that minimises ‖v − A x‖. Stops after ``iters`` products or when the
    relative residual is below ``tol``; a solve that claims ``tol`` spends one more product
    on the true residual of the ``x`` it returns, which ``residual`` and ``converged`` report.
    Keeps ``iters`` vectors of size P.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    b = flat(v)
    if float(b.norm()) == 0.0:
        return SolveResult(x=zeros_like(v), products=0, iters=0, residual=0.0, converged=True)
    arnoldi = _Arnoldi(b)
    residual, k = 1.0, 0
    while k < iters:
        w = flat(matvec(unflat(arnoldi.basis[k], v)))
        w_norm = float(w.norm())
        w, below = arnoldi.extend(w)
        k += 1
        residual = abs(arnoldi.rhs[k]) / arnoldi.b_norm
        if residual <= tol or below <= 1e3 * torch.finfo(b.dtype).eps * w_norm:
            break  # converged, or the Krylov space is invariant (A q_k lies in it): x is exact
        arnoldi.basis.append(w / below)
    x = unflat(arnoldi.solution(), v)
    if residual <= max(tol, 1e-12):
        # the small problem's residual is the true one only up to the basis' loss of
        # orthogonality, which in low precision on ill-conditioned systems claims convergence
        # the iterate does not have: one product measures the residual of the x returned
        _, true = true_residual(matvec, x, v, "the GMRES solve")
        return SolveResult(x=x, products=k + 1, iters=k, residual=true, converged=true <= max(tol, 1e-12))
    return SolveResult(x=x, products=k, iters=k, residual=residual, converged=False)
