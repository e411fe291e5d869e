"""``implicit-nystrom``: IFT with a rank-k Nyström approximation of H (Hataya & Yamada, 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._src.implicit import implicit_hypergradient
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import SolveResult, nystrom
from .._src.stats import Stats
from .._src.typing import Tensors
from .base import Mode, check_positive, register_mode

__all__ = ["ImplicitNystrom"]


@register_mode
@dataclass
class ImplicitNystrom(Mode):
    """``x = (C M⁺ Cᵀ + ρI)⁻¹ ∂g/∂θ`` with ``C = H[:, S]``, ``M = H[S, S]``, ``|S| = rank``.

    Options:
        rank: number k of Hessian columns, drawn uniformly without replacement (default 10;
            capped at the number of parameters P).
        rho: ρ > 0 regularises the low-rank approximation (default 0.1); it stands in for the Hessian in
            the directions the k columns miss, so choose it near the small end of the
            spectrum: too small amplifies those directions by 1/ρ. With ``rank = P``
            the result is exactly ``(H + ρI)⁻¹ ∂g/∂θ``.
        generator: a ``torch.Generator`` or an int seed for the column draw (default seed 0,
            so runs are reproducible); its state is part of ``state_dict()``.

    One pass of k products (batched on CUDA), no iteration. Assumes H symmetric.
    """

    name: ClassVar[str] = "implicit-nystrom"
    rank: int = 10
    rho: float = 0.1
    generator: torch.Generator | int | None = None
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("rank", self.rank, integer=True)
        check_positive("rho", self.rho)
        if isinstance(self.generator, torch.Generator):
            self._generator = self.generator
        elif self.generator is None or isinstance(self.generator, int):
            self._generator = torch.Generator().manual_seed(0 if self.generator is None else self.generator)
        else:
            raise TypeError(
                f"option generator must be a torch.Generator or an int seed, got {self.generator!r}"
            )

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            size = sum(t.numel() for t in v)
            k = min(self.rank, size)
            indices = torch.randperm(size, generator=self._generator)[:k].to(v[0].device)
            unit_rows = torch.zeros(k, size, dtype=v[0].dtype, device=v[0].device)
            unit_rows[torch.arange(k, device=v[0].device), indices] = 1.0
            columns = operator.matmat(unit_rows)
            stats.extra["rank"] = k
            return nystrom(columns, indices, v, self.rho)

        return implicit_hypergradient(problem, solve, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"].cpu())  # a byte tensor, wherever map_location put it

    def state_fits_one_layout(self) -> bool:
        return False  # the generator draws column indices for a problem of any size
