"""What one hypergradient call did, for users comparing modes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .solvers import SolveResult

__all__ = ["Stats"]


@dataclass
class Stats:
    """Filled by every call of :class:`~bilevel.HyperGradient`.

    Attributes:
        mode: the mode name.
        hvps: Hessian-vector (or Jacobian-vector) products used, power iterations included.
        residual: relative residual ‖v − H x‖/‖v‖ of the linear solve, where there is one.
        converged: whether the solve succeeded by the solver's own test, which is not an
            accuracy guarantee everywhere: CG and GMRES met ``tol``; Neumann's residual fell
            below ‖v‖ without growing (it has no tolerance: read ``residual``); Nyström and
            the dense solve were not singular (Nyström's low rank is an approximation it
            cannot measure); None where the mode has no solver or no residual.
        breakdown: how the solve broke down, if it did: ``"negative_curvature"``,
            ``"diverged"`` or ``"singular"`` (the flags below say the same), and
            ``breakdown_message`` the solver's explanation with the fix.
        negative_curvature: CG met pᵀHp ≤ 0 (the inner Hessian is not positive definite).
        diverged: an iteration grew instead of shrinking (Neumann: α above 2/λmax, or an
            indefinite Hessian).
        singular: a dense or Nyström core matrix was numerically singular.
        wall_time: seconds for the call.
        iters: solver iterations (or unrolled steps).
        extra: mode-specific facts (chosen ``alpha``, Nyström indices, peak memory, ...).
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
        self.negative_curvature = result.negative_curvature
        self.diverged = result.diverged
        self.singular = result.singular

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
