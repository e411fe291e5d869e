"""``implicit-identity``: the zeroth-order IFT approximation H⁻¹ ≈ α·I (no Hessian products)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .._src.implicit import implicit_hypergradient
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import SolveResult
from .._src.stats import Stats
from .._src.tree_math import scale
from .._src.typing import Tensors
from .base import ImplicitMode, check_positive, register_mode

__all__ = ["ImplicitIdentity"]


@register_mode
@dataclass
class ImplicitIdentity(ImplicitMode):
    """``dg/dφ ≈ ∂g/∂φ − α (∇²φθ f) ∂g/∂θ``: one mixed product, no Hessian-vector products.

    The one-step ("T1–T2", first-order DARTS) approximation: the first Neumann term. Cheap,
    biased; useful when the inner Hessian is unavailable (an op without double backward
    that touches only θ) or as a baseline. Option ``alpha`` (default 1.0): the scale of the
    identity approximation, usually the inner learning rate.

    Also ``hvp`` and ``fd_eps``, as every implicit mode (:class:`~bilevel.modes.base.ImplicitMode`).
    """

    name: ClassVar[str] = "implicit-identity"
    supports_nonsymmetric: ClassVar[bool] = True
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("alpha", self.alpha)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            return SolveResult(x=scale(self.alpha, v), products=0, iters=0)  # no system solved: no verdict

        return implicit_hypergradient(problem, solve, stats, rule=self.rule)
