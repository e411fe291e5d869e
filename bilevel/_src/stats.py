"""What one hypergradient call did, for users comparing modes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .solvers import SolveResult

__all__ = ["Stats", "not_converged"]


def not_converged(residual: float | None) -> str:
    """The explanation of a solve that stopped above its tolerance."""
    measured = f" (relative residual {residual:.1e})" if residual is not None else ""
    return (
        f"the linear solve stopped above its tolerance{measured}, so the hypergradient is "
        "inaccurate: raise the mode's budget (iters; rank for implicit-nystrom), or bound an "
        "ill-conditioned system with damping"
    )


@dataclass
class Stats:
    """Filled by every call of :class:`~bilevel.HyperGradient`.

    Attributes:
        mode: the mode name.
        hvps: Hessian-vector (or Jacobian-vector) products used, power iterations included.
        residual: relative residual ‖v − H x‖/‖v‖ of the linear solve, where there is one.
        converged: one meaning in every mode: the relative residual ‖(A + damping)x − v‖/‖v‖
            of the system the mode solved was measured and is at most the mode's ``tol``
            (CG, GMRES, Neumann, Nyström with its residual product, the dense solve: not
            singular, residual at rounding; the penalty mode: y's stationarity met ``tol``).
            False when measured above it (or on a breakdown), None where nothing was
            measured (implicit-identity, Neumann or Nyström with ``residual=False``, unrolled
            modes); never True unmeasured. False warns once per ``HyperGradient``
            (``strict=True`` raises).
        breakdown: how the solve broke down, if it did: ``"negative_curvature"``,
            ``"diverged"`` or ``"singular"`` (the flags below say the same), or
            ``"not_converged"`` (the residual stayed above ``tol``; the penalty mode: its y
            missed ``tol``, an error that the estimate multiplies by λ), or
            ``"params_not_at_minimum"`` (the penalty mode: λ‖∇θf‖/‖∇θg‖ above 1/λ), and
            ``breakdown_message`` the solver's explanation with the fix.
        negative_curvature: CG met pᵀHp ≤ 0 (the inner Hessian is not positive definite).
        diverged: an iteration grew instead of shrinking (Neumann: α above 2/λmax, or an
            indefinite Hessian).
        singular: a dense or Nyström core matrix was numerically singular.
        wall_time: seconds for the call.
        iters: solver iterations (or unrolled steps).
        extra: mode-specific facts: the chosen ``alpha``, ``rank`` and ``rho``, ``damping`` and
            ``lambda_max`` (``damping="auto"``), ``min_residual_iterate`` (CG returned an
            earlier iterate), ``preconditioner``, ``gradient_evaluations`` and ``fd_eps``
            (finite-difference products; the penalty mode), ``saved_bytes_peak``,
            ``checkpoint_segment``, ``tangent_bytes``, ...
    """

    mode: str
    hvps: int = 0
    residual: float | None = None
    converged: bool | None = None
    breakdown: str | None = None
    breakdown_message: str = ""
    negative_curvature: bool = False
    diverged: bool = False
    singular: bool = False
    wall_time: float = 0.0
    iters: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, result: SolveResult, hvps: int) -> None:
        """Take a linear solve's diagnostics, and the products the call made."""
        self.hvps = hvps
        self.iters = result.iters
        self.residual = result.residual
        self.converged = result.converged
        self.breakdown, self.breakdown_message = result.breakdown, result.message
        if result.converged is False and result.breakdown is None:
            self.breakdown = "not_converged"
            self.breakdown_message = not_converged(result.residual)
        self.negative_curvature = result.negative_curvature
        self.diverged = result.diverged
        self.singular = result.singular

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
