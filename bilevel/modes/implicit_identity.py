"""``implicit-identity``: the zeroth-order IFT approximation H⁻¹ ≈ α·I (no Hessian products)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._src.errors import NoDoubleBackwardError
from .._src.implicit import implicit_hypergradient
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import SolveResult, true_residual
from .._src.stats import Stats
from .._src.tree_math import scale
from .._src.typing import Tensors
from .base import ImplicitMode, check_flag, check_positive, register_mode

__all__ = ["ImplicitIdentity"]


@register_mode
@dataclass
class ImplicitIdentity(ImplicitMode):
    """``dg/dφ ≈ ∂g/∂φ − α (∇²φθ f) ∂g/∂θ``: one mixed product, no Hessian solve.

    The one-step ("T1–T2", first-order DARTS) approximation: the first Neumann term. Cheap,
    biased; a baseline, or for an inner Hessian that has no product at all (an op without
    double backward that touches only θ: then ``residual=False``).

    Options:
        alpha: the scale of the identity approximation, usually the inner learning rate
            (default 1.0).
        residual: spend one Hessian product on ‖∂g/∂θ − H x‖/‖∂g/∂θ‖ for x = α ∂g/∂θ
            (``stats.residual``; default True), the measure of how far αI is from H⁻¹ here.
            ``False``: no product, ``stats.converged`` None; so too where the Hessian has no
            product (an op without double backward: the reason in
            ``stats.extra["residual_unavailable"]``).
        tol: ``stats.converged`` is residual ≤ tol (default 1e-3); above it the call warns,
            as it usually will: the approximation is biased.

    Also ``hvp`` and ``fd_eps``, as every implicit mode (:class:`~bilevel.modes.base.ImplicitMode`).
    """

    name: ClassVar[str] = "implicit-identity"
    supports_nonsymmetric: ClassVar[bool] = True
    alpha: float = 1.0
    residual: bool = True
    tol: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("alpha", self.alpha)
        check_flag("residual", self.residual)
        check_positive("tol", self.tol, allow_zero=True)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            x = scale(self.alpha, v)
            if not self.residual:
                return SolveResult(x=x, products=0, iters=0)  # nothing measured: no verdict
            try:
                _, residual = true_residual(operator.matvec, x, v, "the identity approximation")
            except NoDoubleBackwardError as error:  # the case this mode exists for: no Hessian products
                stats.extra["residual_unavailable"] = str(error).split(". ")[0]
                return SolveResult(x=x, products=0, iters=0)
            return SolveResult(x=x, products=1, iters=0, residual=residual, converged=residual <= self.tol)

        return implicit_hypergradient(problem, solve, stats, rule=self.rule)
