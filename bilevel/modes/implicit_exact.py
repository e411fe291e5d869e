"""``implicit-exact``: IFT with the inner Hessian materialised and solved densely."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._src.implicit import implicit_hypergradient
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import SolveResult, dense_solve
from .._src.stats import Stats
from .._src.typing import Tensors
from .base import ImplicitMode, check_positive, register_mode

__all__ = ["ImplicitExact"]


@register_mode
@dataclass
class ImplicitExact(ImplicitMode):
    """Build the P×P matrix ``Jᵀ`` (the Hessian for a loss) from P products and solve it.

    The reference for the other modes on small problems. Option ``max_params`` (default
    5000): refuse larger problems, whose P products and P² memory would be prohibitive.
    Handles non-symmetric systems. A numerically singular matrix is reported in
    ``stats.singular`` (with a warning) and solved in the least-squares sense.

    Also ``hvp`` and ``fd_eps``, as every implicit mode (:class:`~bilevel.modes.base.ImplicitMode`).
    """

    name: ClassVar[str] = "implicit-exact"
    supports_nonsymmetric: ClassVar[bool] = True
    max_params: int = 5000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("max_params", self.max_params, integer=True)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)
        size = sum(t.numel() for t in problem.theta0)
        if size > self.max_params:
            raise ValueError(
                f"implicit-exact materialises the {size}x{size} inner Hessian, above "
                f"max_params={self.max_params}; raise max_params if you can afford "
                f"{size} Hessian-vector products and {size * size} entries, or use "
                "mode='implicit-cg'"
            )

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            identity = torch.eye(size, dtype=v[0].dtype, device=v[0].device)
            rows = operator.matmat(identity)  # row i = Jᵀ e_i, so the stack is J
            return dense_solve(rows.T, v)

        return implicit_hypergradient(problem, solve, stats, rule=self.rule)
