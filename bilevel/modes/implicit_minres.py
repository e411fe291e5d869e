"""``implicit-minres``: IFT with the symmetric, possibly indefinite, system solved by MINRES."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._src.implicit import implicit_hypergradient
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import SolveResult, minres
from .._src.stats import Stats
from .._src.typing import Tensors
from ._warm_start import WarmStarted
from .base import ImplicitMode, check_flag, check_positive, register_mode

__all__ = ["ImplicitMINRES"]


@register_mode
@dataclass
class ImplicitMINRES(WarmStarted, ImplicitMode):
    """Solve ``(H + damping·I) x = ∂g/∂θ`` by MINRES: the Krylov method for symmetric
    Hessians that need not be positive definite (params near, not at, a minimum of a
    non-convex inner problem), where CG breaks down.

    Options:
        iters: at most this many Hessian-vector products for the solve (default 50), plus
            one that measures the final residual; indefinite systems often need several
            times CG's.
        tol: stop when ‖r‖ ≤ tol·‖∂g/∂θ‖ (default 1e-6).
        damping: λ ≥ 0 added to the diagonal (default 0).
        warm_start: start each solve from the previous call's solution when the shapes
            match and that solve converged.

    Returns the ``x`` of smallest residual in the Krylov space: on a nonsingular ``H``
    (indefinite or not) the IFT answer ``H⁻¹∂g/∂θ``; on a singular ``H`` the minimum-norm
    least-squares solution ``H⁺∂g/∂θ`` once the Krylov space is exhausted (with the breakdown
    ``"singular"`` when ∂g/∂θ has a null-space part, which no ``x`` matches). The undamped
    answer at a non-convex point can be dominated by directions of near-zero negative
    curvature; ``implicit-cg`` with ``damping="auto"`` gives a damped, bounded one.
    ``stats.extra["negative_curvature_share"]`` says how much of ‖x‖² (of its Krylov part, all
    of it from a cold start) lies along negative Ritz directions of the Lanczos tridiagonal,
    and ``["negative_ritz_values"]`` how many there are: a share near 1 means the answer comes
    from directions of negative curvature, where the IFT answer is a poor descent direction.

    Also ``hvp`` and ``fd_eps``, as every implicit mode (:class:`~bilevel.modes.base.ImplicitMode`).
    """

    name: ClassVar[str] = "implicit-minres"
    iters: int = 50
    tol: float = 1e-6
    damping: float = 0.0
    warm_start: bool = False
    _previous: Tensors | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("iters", self.iters, integer=True)
        check_positive("tol", self.tol, allow_zero=True)
        check_positive("damping", self.damping, allow_zero=True)
        check_flag("warm_start", self.warm_start)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            result = minres(operator.matvec, v, self.iters, self.tol, self.damping, x0=self._start(v))
            if "negative_share" in result.info:  # host numbers of the Lanczos tridiagonal
                stats.extra["negative_curvature_share"] = float(result.info["negative_share"])
                stats.extra["negative_ritz_values"] = int(result.info["negative_ritz"])
            self._remember(result.x, bool(result.converged))
            return result

        return implicit_hypergradient(problem, solve, stats, rule=self.rule)

    def state_dict(self) -> dict[str, Any]:
        return self._warm_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_warm_state(state)

    def state_fits_one_layout(self) -> bool:
        return self._warm_state_used()
