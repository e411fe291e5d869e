"""``implicit-nystrom``: IFT with a rank-k Nyström approximation of H (Hataya & Yamada, 2023)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._src.implicit import implicit_hypergradient
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import SolveResult, true_residual
from .._src.solvers.nystrom import Sketch, column_sketch, gaussian_sketch, sketch_solve
from .._src.stats import Stats
from .._src.typing import Tensors
from .base import ImplicitMode, check_flag, check_positive, register_mode

__all__ = ["ImplicitNystrom"]

SKETCHES = ("columns", "gaussian")


@register_mode
@dataclass
class ImplicitNystrom(ImplicitMode):
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
        residual: spend one more product on the residual ‖∂g/∂θ − Hx‖/‖∂g/∂θ‖ against the
            Hessian itself (``stats.residual``; default True): the only measure of how well
            the low rank and ρ stand in for H. ``False``: ``stats.converged`` is None.
        tol: ``stats.converged`` is residual ≤ tol (default 1e-3); above it the call warns.

    One pass of k products (batched on CUDA), no iteration. Assumes H symmetric.

    Also ``hvp`` and ``fd_eps``, as every implicit mode (:class:`~bilevel.modes.base.ImplicitMode`).
    """

    name: ClassVar[str] = "implicit-nystrom"
    rank: int = 10
    rho: float | str = "auto"
    generator: torch.Generator | int | None = None
    residual: bool = True
    tol: float = 1e-3
    sketch: str = "gaussian"
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("rank", self.rank, integer=True)
        if self.rho != "auto":
            check_positive("rho", self.rho)
        if self.sketch not in SKETCHES:
            raise ValueError(
                f"option sketch must be one of {', '.join(map(repr, SKETCHES))}, got {self.sketch!r}"
            )
        check_flag("residual", self.residual)
        check_positive("tol", self.tol, allow_zero=True)
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
            sketch = self._sketch(operator, v, size, k)
            rho = self._rho(sketch)
            stats.extra.update(rank=k, rho=rho)
            result = dataclasses.replace(sketch_solve(sketch, v, rho), products=k)
            return self._measured(result, operator, v) if self.residual else result

        return implicit_hypergradient(problem, solve, stats, rule=self.rule)

    def _sketch(self, operator: StationarityJacobian, v: Tensors, size: int, k: int) -> Sketch:
        """The rank-k approximation of H from k products (one batch where that is faster)."""
        dtype, device = v[0].dtype, v[0].device
        if self.sketch == "gaussian":
            return gaussian_sketch(operator.matmat, size, k, dtype, device, self._generator)
        indices = torch.randperm(size, generator=self._generator)[:k].to(device)
        unit_rows = torch.zeros(k, size, dtype=dtype, device=device)
        unit_rows[torch.arange(k, device=device), indices] = 1.0
        return column_sketch(operator.matmat(unit_rows), indices)

    def _rho(self, sketch: Sketch) -> float:
        """ρ as given, or for ``"auto"`` the smallest eigenvalue the sketch resolved (its
        estimate of where the unseen spectrum starts), at least ε·λ̂max."""
        if not isinstance(self.rho, str):
            return float(self.rho)
        values = sketch.eigenvalues
        floor = float(values.max()) * torch.finfo(values.dtype).eps ** 0.5
        resolved = values[values > floor]
        return float(resolved.min()) if resolved.numel() else max(floor, torch.finfo(values.dtype).tiny)

    def _measured(self, result: SolveResult, operator: StationarityJacobian, v: Tensors) -> SolveResult:
        """The result with its residual ‖v − Hx‖/‖v‖ against the Hessian itself (one more
        product): the low rank and ρ are approximations, and only this measures them."""
        _, residual = true_residual(operator.matvec, result.x, v, "the Nyström solve")
        converged = result.breakdown is None and residual <= self.tol
        return dataclasses.replace(
            result, products=result.products + 1, residual=residual, converged=converged
        )

    def random_seed(self) -> int:
        return int(torch.randint(0, 2**52, (), generator=self._generator))

    def reseed(self, seed: int) -> None:
        self._generator.manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"].cpu())  # a byte tensor, wherever map_location put it

    def state_fits_one_layout(self) -> bool:
        return False  # the generator draws column indices for a problem of any size
