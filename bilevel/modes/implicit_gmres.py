"""``implicit-gmres``: IFT with the (possibly non-symmetric) system solved by GMRES."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._src.implicit import implicit_hypergradient
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import SolveResult, gmres
from .._src.stats import Stats
from .._src.typing import Tensors
from .base import ImplicitMode, check_positive, register_mode

__all__ = ["ImplicitGMRES"]


@register_mode
@dataclass
class ImplicitGMRES(ImplicitMode):
    """Solve ``Jᵀ x = ∂g/∂θ`` by GMRES: the Krylov method for non-symmetric systems, such as
    the stationarity maps of module-aware auxiliary weighting (for a loss, ``Jᵀ = H``).

    Options:
        iters: at most this many products (default 50); GMRES stores one vector per product.
        tol: stop when ‖v − Jᵀx‖ ≤ tol·‖v‖ (default 1e-6).

    Needs only ``Jᵀ`` invertible: neither symmetry nor positive definiteness.

    Also ``hvp`` and ``fd_eps``, as every implicit mode (:class:`~bilevel.modes.base.ImplicitMode`).
    """

    name: ClassVar[str] = "implicit-gmres"
    supports_nonsymmetric: ClassVar[bool] = True
    iters: int = 50
    tol: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("iters", self.iters, integer=True)
        check_positive("tol", self.tol, allow_zero=True)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            return gmres(operator.matvec, v, self.iters, self.tol)

        return implicit_hypergradient(problem, solve, stats, rule=self.rule)
