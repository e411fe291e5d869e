"""``implicit-cg``: IFT with the Hessian system solved by conjugate gradient."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..implicit import implicit_hypergradient
from ..problem import BilevelProblem
from ..solvers import Tensors, conjugate_gradient
from ..stats import Stats
from .base import Mode, check_positive, register_mode


@register_mode
@dataclass
class ImplicitCG(Mode):
    """Solve ``(H + damping·I) x = ∂g/∂θ`` by conjugate gradient.

    Options:
        iters: at most this many Hessian-vector products (default 50).
        tol: stop when ‖r‖ ≤ tol·‖∂g/∂θ‖ (default 1e-6).
        damping: λ ≥ 0 added to the diagonal; a small λ regularises ill-conditioned or
            slightly indefinite Hessians at the price of bias (default 0).
        warm_start: start each solve from the previous call's solution when the shapes
            match and that solve converged; an online loop whose system changes slowly then
            needs fewer products (benchmarks/warm_start.py measures it).

    Assumes ``H`` is symmetric positive definite; pᵀHp ≤ 0 stops the solve and is reported
    in ``stats.negative_curvature`` (with a warning).
    """

    name: ClassVar[str] = "implicit-cg"
    iters: int = 50
    tol: float = 1e-6
    damping: float = 0.0
    warm_start: bool = False
    _previous: Tensors | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("iters", self.iters, integer=True)
        check_positive("tol", self.tol, allow_zero=True)
        check_positive("damping", self.damping, allow_zero=True)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)

        def solve(operator, v):
            x0 = self._previous if self.warm_start else None
            if x0 is not None and [t.shape for t in x0] != [t.shape for t in v]:
                x0 = None
            result = conjugate_gradient(operator.matvec, v, self.iters, self.tol, self.damping, x0=x0)
            if self.warm_start:  # only a solve that converged is a good start for the next one
                self._previous = tuple(t.detach() for t in result.x) if result.converged else None
            return result

        return implicit_hypergradient(problem, solve, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self._previous} if self._previous is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._previous = state.get("previous")
