"""``implicit-neumann``: IFT with H⁻¹ approximated by a truncated Neumann series."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .._src.compiled import CompiledPath, compiled_path, implicit_program
from .._src.errors import check_finite
from .._src.implicit import check_autocast, implicit_hypergradient
from .._src.problem import BilevelProblem
from .._src.solvers import (neumann, neumann_report, neumann_series, power_iteration,
                            power_iteration_estimate, random_start)
from .._src.typing import MatVec, Tensors
from .._src.stats import Stats
from .base import Mode, check_flag, check_positive, register_mode

_ZERO_CURVATURE = ("alpha='auto': the inner Hessian is zero along the power iteration; set alpha "
                   "explicitly")


@register_mode
@dataclass
class ImplicitNeumann(Mode):
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
        compile: run the call as one compiled program (``torch.compile``; a CUDA graph on
            CUDA) after a first eager call; ``True`` or a dict of ``torch.compile`` keywords
            (see :mod:`bilevel.compiled`).
        autocast: ``torch.bfloat16`` (or ``torch.float16``): build the inner gradient graph
            under ``torch.autocast``, so the Hessian products run in that precision while the
            solver accumulates in the params' dtype (opt-in; ``benchmarks/precision.py``
            measures the accuracy cost).

    Valid for non-symmetric systems. A residual that grows (α too large) is reported in
    ``stats.diverged`` with a warning.
    """

    name: ClassVar[str] = "implicit-neumann"
    supports_nonsymmetric: ClassVar[bool] = True
    iters: int = 20
    residual: bool = True
    alpha: float | str = "auto"
    power_iters: int = 10
    compile: bool | dict = False
    autocast: torch.dtype | None = None
    _fast: CompiledPath | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("iters", self.iters, integer=True)
        check_flag("residual", self.residual)
        check_positive("power_iters", self.power_iters, integer=True)
        if self.alpha != "auto":
            check_positive("alpha", self.alpha)
        check_autocast(self.autocast)
        self._fast = compiled_path(implicit_program, self.compile)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)
        if self._fast is not None:
            start = random_start(problem.theta0, _generator()) if self.alpha == "auto" else None
            out = self._fast(problem, self.autocast, _series, self.iters, self.alpha, self.power_iters, start,
                             self.residual)
            if out is not None:
                return self._finish_compiled(out, stats)

        def solve(operator, v):
            alpha = self.alpha
            if alpha == "auto":
                largest = power_iteration(operator.matvec, v, self.power_iters, _generator())
                if largest == 0.0:
                    raise ValueError(_ZERO_CURVATURE)
                alpha = 1.0 / largest
                stats.extra["lambda_max"] = largest
            stats.extra["alpha"] = alpha
            return neumann(operator.matvec, v, self.iters, alpha, self.residual)

        return implicit_hypergradient(problem, solve, stats, self.autocast)

    def _finish_compiled(self, out: tuple, stats: Stats) -> Tensors:
        grads, x, info = out
        alpha = self.alpha
        if alpha == "auto":
            largest = float(info["lambda_max"])
            if largest == 0.0:
                raise ValueError(_ZERO_CURVATURE)
            alpha = 1.0 / largest
            stats.extra["lambda_max"] = largest
        stats.extra["alpha"] = alpha
        result = neumann_report(x, info["norms"], self.iters, alpha, self.residual)
        check_finite(grads, "the mixed second-derivative product ∇²φθ f · x")
        stats.hvps = result.products + (self.power_iters if self.alpha == "auto" else 0)
        stats.iters, stats.residual = result.iters, result.residual
        stats.converged, stats.diverged = result.converged, result.diverged
        stats.extra["compiled"] = True
        return grads


def _generator() -> torch.Generator:
    """The power iteration's start is drawn from a fixed seed: calls are reproducible."""
    return torch.Generator().manual_seed(0)


def _series(matvec: MatVec, v: Tensors, iters: int, alpha: float | str, power_iters: int,
            start: Tensors | None, residual: bool) -> tuple[Tensors, dict[str, Tensor]]:
    """The compiled program's solve: the power iteration (for ``alpha="auto"``, from
    ``start``) and the series, without host synchronisation."""
    info = {}
    if start is not None:
        info["lambda_max"] = power_iteration_estimate(matvec, start, power_iters)
        alpha = 1.0 / info["lambda_max"]
    x, info["norms"] = neumann_series(matvec, v, iters, alpha, residual)
    return x, info
