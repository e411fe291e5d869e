"""``implicit-neumann``: IFT with H⁻¹ approximated by a truncated Neumann series."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .._src.compiled import CompiledPath, compiled_path
from .._src.implicit import check_autocast, finish_compiled, implicit_hypergradient, implicit_program
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import (
    SolveResult,
    neumann,
    neumann_report,
    power_iteration,
    power_iteration_estimate,
    random_start,
)
from .._src.stats import Stats
from .._src.typing import Tensors
from .base import ImplicitMode, check_flag, check_positive, register_mode

__all__ = ["ImplicitNeumann"]

_ZERO_CURVATURE = "alpha='auto': the inner Hessian is zero along the power iteration; set alpha explicitly"


@register_mode
@dataclass
class ImplicitNeumann(ImplicitMode):
    """``x = α Σ_{j<K} (I − αH)ʲ ∂g/∂θ`` with ``K = iters`` terms (``iters`` products).

    Options:
        iters: number of terms K (default 20); equals ``truncate`` in ``truncated-unroll``.
        residual: spend the K-th product on the exact residual ‖(I − αH)ᴷ ∂g/∂θ‖ / ‖∂g/∂θ‖
            of the returned sum (``stats.residual``; default True). ``False`` saves it
            (K − 1 products, as torchopt's and hypertorch's series of K terms): divergence is
            then judged on the last term, one term earlier, ``stats.residual`` is None and
            ``stats.converged`` is None unless the series diverged. The result is the same.
        alpha: step α, or ``"auto"`` (default): estimate λmax by ``power_iters`` power
            iterations (counted in ``stats.hvps``) and take α = 1/λmax, inside the
            convergence region α < 2/λmax even if λmax is underestimated by half.
        power_iters: power iterations for ``alpha="auto"`` (default 10).
        tol: ``stats.converged`` is residual ≤ tol (default 1e-3; a series of K terms is an
            approximation, and this judges it: above tol the call warns). The series always
            sums its K terms.
        compile: run the call as one compiled program (``torch.compile``; a CUDA graph on
            CUDA) after a first eager call; ``True`` or a dict of ``torch.compile`` keywords
            (see :mod:`bilevel._src.compiled`).
        autocast: ``torch.bfloat16`` (or ``torch.float16``): build the inner gradient graph
            under ``torch.autocast``, so the Hessian products run in that precision while the
            solver accumulates in the params' dtype (opt-in; ``benchmarks/precision.py``
            measures the accuracy cost).

    Valid for non-symmetric systems. A residual that grows (α too large) is reported in
    ``stats.diverged`` with a warning.

    Also ``hvp`` and ``fd_eps``, as every implicit mode (:class:`~bilevel.modes.base.ImplicitMode`).
    """

    name: ClassVar[str] = "implicit-neumann"
    supports_nonsymmetric: ClassVar[bool] = True
    iters: int = 20
    residual: bool = True
    alpha: float | str = "auto"
    power_iters: int = 10
    compile: bool | dict = False
    autocast: torch.dtype | None = None
    tol: float = 1e-3
    _fast: CompiledPath | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("iters", self.iters, integer=True)
        check_positive("tol", self.tol, allow_zero=True)
        check_flag("residual", self.residual)
        check_positive("power_iters", self.power_iters, integer=True)
        if self.alpha != "auto":
            check_positive("alpha", self.alpha)
        check_autocast(self.autocast, self.rule)
        self._fast = compiled_path(implicit_program, self.compile)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)
        if self._fast is not None:
            start = random_start(problem.theta0, _generator()) if self.alpha == "auto" else None
            fixed = None if isinstance(self.alpha, str) else self.alpha
            out = self._fast(
                problem,
                self.autocast,
                self.rule,
                _solve_on_device,
                self.iters,
                fixed,
                self.power_iters,
                start,
                self.residual,
            )
            if out is not None:
                return self._finish_compiled(out, stats)

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            if isinstance(self.alpha, str):  # "auto": 1/λmax from the power iteration
                largest = power_iteration(operator.matvec, v, self.power_iters, _generator())
                alpha = self._auto_alpha(largest, stats)
            else:
                alpha = self.alpha
            stats.extra["alpha"] = alpha
            return neumann(operator.matvec, v, self.iters, alpha, self.residual, tol=self.tol)

        return implicit_hypergradient(problem, solve, stats, self.autocast, self.rule)

    @staticmethod
    def _auto_alpha(largest: float, stats: Stats) -> float:
        if largest == 0.0:
            raise ValueError(_ZERO_CURVATURE)
        stats.extra["lambda_max"] = largest
        return 1.0 / largest

    def _finish_compiled(self, out: tuple[Tensors, Tensors, dict[str, Tensor]], stats: Stats) -> Tensors:
        grads, x, info = out
        if isinstance(self.alpha, str):
            alpha = self._auto_alpha(float(info["lambda_max"]), stats)
        else:
            alpha = self.alpha
        stats.extra["alpha"] = alpha
        result = neumann_report(SolveResult(x, 0, self.iters, info=info), alpha, self.residual, self.tol)
        hvps = result.products + (self.power_iters if self.alpha == "auto" else 0)
        return finish_compiled(result, grads, stats, hvps, rule=self.rule)


def _generator() -> torch.Generator:
    """The power iteration's start is drawn from a fixed seed: calls are reproducible."""
    return torch.Generator().manual_seed(0)


def _solve_on_device(
    operator: StationarityJacobian,
    v: Tensors,
    iters: int,
    alpha: float | None,
    power_iters: int,
    start: Tensors | None,
    residual: bool,
) -> SolveResult:
    """The compiled program's solve: the power iteration (for ``alpha="auto"``, from
    ``start``) and the same series, without host synchronisation."""
    if start is None:
        assert alpha is not None
        return neumann(operator.matvec, v, iters, alpha, residual, sync=False)
    largest = power_iteration_estimate(operator.matvec, start, power_iters)
    result = neumann(operator.matvec, v, iters, 1.0 / largest, residual, sync=False)
    result.info["lambda_max"] = largest
    return result
