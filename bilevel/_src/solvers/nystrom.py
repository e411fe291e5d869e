"""Nyström approximations ``A ≈ U diag(λ̂) Uᵀ`` of a symmetric operator from ``k`` products,
and the solves and preconditioners built on them.

Two sketches: :func:`gaussian_sketch`, the randomized Nyström approximation with the
numerically stable construction (a shift, a Cholesky factor and an SVD: Tropp, Yurtsever, Udell
and Cevher, 2017), and :func:`column_sketch`, ``C M⁺ Cᵀ`` from ``k`` sampled columns
(Hataya and Yamada's choice). Both return a :class:`Sketch`: an orthonormal basis ``U`` of
``k`` columns and the approximate eigenvalues. For PSD ``A`` a Nyström approximation never
exceeds ``A`` (``U diag(λ̂) Uᵀ ≼ A``), so its eigenvalues are underestimates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import flat, unflat
from ..typing import Tensors
from .result import SolveResult

__all__ = [
    "SINGULAR",
    "MatMat",
    "Sketch",
    "column_sketch",
    "gaussian_sketch",
    "nystrom_preconditioner",
    "sketch_solve",
]

#: ``rows ↦ rows Aᵀ``: ``A`` applied to each row of a ``(k, P)`` batch
MatMat = Callable[[Tensor], Tensor]

SINGULAR = (
    "the Nyström core matrix is numerically singular (a pseudo-inverse was used): the sampled "
    "directions carry no curvature; raise rank, or check that params is a strict minimum"
)


@dataclass
class Sketch:
    """``A ≈ U diag(λ̂) Uᵀ``: ``basis`` U is ``(P, r)`` with orthonormal columns and
    ``eigenvalues`` λ̂ are ``(r,)``, descending; ``singular``: the core needed a pseudo-inverse."""

    basis: Tensor
    eigenvalues: Tensor
    singular: bool = False


def gaussian_sketch(
    matmat: MatMat, size: int, rank: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> Sketch:
    """The randomized Nyström approximation from a Gaussian test matrix Ω (``rank`` columns,
    orthonormalised, drawn on the CPU so any device gives the same draw):

        Y = AΩ,  ν = √P·ε·‖Y‖₂,  Y_ν = Y + νΩ,  Ωᵀ Y_ν = LLᵀ,  B = Y_ν L⁻ᵀ = U Σ Vᵀ,
        λ̂ = max(Σ² − ν, 0).

    The shift ν keeps the Cholesky factorisation of the (PSD, possibly singular) core stable
    and is removed afterwards. Assumes ``A`` PSD; a core that is not (an indefinite
    Hessian) falls back to its eigenvalue decomposition with a pseudo-inverse, flagged
    ``singular``."""
    omega = torch.randn(size, rank, generator=generator, dtype=dtype).to(device)
    omega = torch.linalg.qr(omega).Q
    y = matmat(omega.T).T  # (P, k) = AΩ
    _check_finite(y)
    shift = math.sqrt(size) * torch.finfo(dtype).eps * torch.linalg.matrix_norm(y, 2)
    shifted = y + shift * omega
    core = omega.T @ shifted
    factor, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
    if int(info) != 0:  # not PSD along Ω: the pseudo-inverse of the core, flagged
        fallback = _low_rank(shifted, core)
        return Sketch(fallback.basis, fallback.eigenvalues - shift, singular=True)
    b = torch.linalg.solve_triangular(factor, shifted.T, upper=False).T  # Y_ν L⁻ᵀ
    u, s, _ = torch.linalg.svd(b, full_matrices=False)
    values = (s * s - shift).clamp_min(0.0)
    # a sketched eigenvalue at rounding level: A is singular along the sketch
    singular = bool((values <= values.max() * rank * torch.finfo(dtype).eps).any())
    return Sketch(u, values, singular)


def column_sketch(columns: Tensor, indices: Tensor) -> Sketch:
    """``C M⁺ Cᵀ`` with ``C = A[:, S]`` given as a ``(k, P)`` batch of rows (row ``i`` is
    ``A e_{S_i}``) and ``M = A[S, S]`` (see :func:`_low_rank`). With ``S`` all indices this is
    ``A`` itself."""
    c = columns.T  # (P, k)
    _check_finite(c)
    return _low_rank(c, c[indices])


def sketch_solve(sketch: Sketch, v: Tensors, rho: float) -> SolveResult:
    """``x = U diag(1/max(λ̂, ρ)) Uᵀ v + (v − UUᵀv)/ρ``: the sketch's inverse on its span and
    ``1/ρ`` outside it (and where the sketch sees less curvature than ρ). ρ stands in only
    for what the sketch does not know, so the error falls as the rank grows on a low-rank
    spectrum; at full rank (and ρ below the smallest eigenvalue) ``x = A⁻¹v``. ``products``
    is 0: the caller counts the sketch's."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    vf = flat(v)
    u = sketch.basis
    coefficients = u.T @ vf
    x = u @ (coefficients / sketch.eigenvalues.clamp_min(rho))
    if u.shape[1] < u.shape[0]:  # the part of v outside the span; none at full rank
        x = x + (vf - u @ coefficients) / rho
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("non-finite values in the Nyström solve; raise rho")
    return SolveResult(
        x=unflat(x, v),
        products=0,
        iters=1,
        breakdown="singular" if sketch.singular else None,
        message=SINGULAR if sketch.singular else "",
    )


def nystrom_preconditioner(sketch: Sketch, damping: float = 0.0) -> Callable[[Tensors], Tensors]:
    """``r ↦ M⁻¹r`` for the Nyström preconditioner of ``A + μI`` (μ = ``damping``; Frangella,
    Tropp and Udell, 2023):

        M⁻¹ = (λ̂_k + μ) U (Λ̂ + μI)⁻¹ Uᵀ + (I − UUᵀ),

    λ̂_k the smallest sketched eigenvalue. On the sketch's span M⁻¹(A + μI) maps an
    eigenvalue λᵢ ≈ λ̂ᵢ to about λ̂_k + μ; outside it leaves A + μI as it is, whose spectrum
    there lies below about λ_{k+1} + μ. So the large eigenvalues that set CG's condition
    number are flattened to the level of the rest, and ``M`` is SPD for any μ ≥ 0. With
    ``Â`` the sketch, the paper bounds the preconditioned condition number by
    ``(λ̂_k + μ + ‖A − Â‖)/μ`` for μ > 0; at μ = 0 the preconditioner deflates, taking κ from
    λ₁/λ_min to about λ_{k+1}/λ_min.

    Directions where λ̂ + μ is at rounding level (a singular or indefinite sketch) are
    left out of ``U``: their scaling would be a division by noise."""
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    shifted = sketch.eigenvalues + damping
    finfo = torch.finfo(shifted.dtype)
    keep = shifted > max(float(shifted.max()) * shifted.numel() * finfo.eps, finfo.tiny)
    basis, shifted = sketch.basis[:, keep], shifted[keep]
    if shifted.numel() == 0:  # no curvature resolved: the identity
        return lambda r: r
    scale = (shifted.min() / shifted) - 1.0  # M⁻¹ = I + U diag((λ̂_k + μ)/(λ̂ + μ) − 1) Uᵀ

    def apply(r: Tensors) -> Tensors:
        f = flat(r)
        return unflat(f + basis @ (scale * (basis.T @ f)), r)

    return apply


def _low_rank(c: Tensor, m: Tensor) -> Sketch:
    """``C M⁺ Cᵀ`` as a :class:`Sketch` (``C`` is ``(P, k)``, ``M`` the ``(k, k)`` core): with
    the thin QR ``C = QR``, the eigenvalues of ``R M⁺ Rᵀ = W diag(λ̂) Wᵀ`` and ``U = QW``.
    ``M⁺`` drops eigenvalues below rounding (then ``singular``)."""
    eigenvalues, vectors = torch.linalg.eigh(_symmetric(m))
    cutoff = eigenvalues.abs().max() * m.shape[0] * torch.finfo(m.dtype).eps
    keep = eigenvalues.abs() > cutoff
    inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, torch.ones_like(eigenvalues)), 0.0)
    q, r = torch.linalg.qr(c)
    rv = r @ vectors
    values, w = torch.linalg.eigh(_symmetric((rv * inverse) @ rv.T))
    order = values.argsort(descending=True)
    return Sketch(q @ w[:, order], values[order], singular=bool((~keep).any()))


def _symmetric(matrix: Tensor) -> Tensor:
    return 0.5 * (matrix + matrix.T)


def _check_finite(products: Tensor) -> None:
    if not bool(torch.isfinite(products).all()):
        raise NonFiniteError("non-finite values in the Hessian products of the Nyström sketch")
