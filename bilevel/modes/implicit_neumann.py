"""``implicit-neumann``: IFT with H⁻¹ approximated by a truncated Neumann series."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..implicit import implicit_hypergradient
from ..problem import BilevelProblem
from ..solvers import Tensors, neumann, power_iteration
from ..stats import Stats
from .base import Mode, check_positive, register_mode


@register_mode
@dataclass
class ImplicitNeumann(Mode):
    """``x = α Σ_{j<K} (I − αH)ʲ ∂g/∂θ`` with ``K = iters`` terms (``iters`` products).

    Options:
        iters: number of terms K (default 20); equals ``truncate`` in ``truncated-unroll``.
        alpha: step α, or ``"auto"`` (default): estimate λmax by ``power_iters`` power
            iterations (counted in ``stats.hvps``) and take α = 1/λmax, inside the
            convergence region α < 2/λmax even if λmax is underestimated by half.
        power_iters: power iterations for ``alpha="auto"`` (default 10).

    Valid for non-symmetric systems. A residual that grows (α too large) is reported in
    ``stats.diverged`` with a warning.
    """

    name: ClassVar[str] = "implicit-neumann"
    supports_nonsymmetric: ClassVar[bool] = True
    iters: int = 20
    alpha: float | str = "auto"
    power_iters: int = 10

    def __post_init__(self) -> None:
        check_positive("iters", self.iters, integer=True)
        check_positive("power_iters", self.power_iters, integer=True)
        if self.alpha != "auto":
            check_positive("alpha", self.alpha)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)

        def solve(operator, v):
            alpha = self.alpha
            if alpha == "auto":
                generator = torch.Generator().manual_seed(0)
                largest = power_iteration(operator.matvec, v, self.power_iters, generator)
                if largest == 0.0:
                    raise ValueError("alpha='auto': the inner Hessian is zero along the power "
                                     "iteration; set alpha explicitly")
                alpha = 1.0 / largest
                stats.extra["lambda_max"] = largest
            stats.extra["alpha"] = alpha
            return neumann(operator.matvec, v, self.iters, alpha)

        return implicit_hypergradient(problem, solve, stats)
