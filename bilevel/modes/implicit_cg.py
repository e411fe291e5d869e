"""``implicit-cg``: IFT with the Hessian system solved by conjugate gradient."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._src.compiled import CompiledPath, compiled_path
from .._src.implicit import check_autocast, finish_compiled, implicit_hypergradient, implicit_program
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import SolveResult, conjugate_gradient, conjugate_gradient_report
from .._src.stats import Stats
from .._src.typing import Tensors
from .base import Mode, check_flag, check_positive, register_mode

__all__ = ["ImplicitCG"]


_SOLVE = "the conjugate-gradient solve (a Hessian-vector product)"


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
        compile: run the call as one compiled program (``torch.compile``; a CUDA graph on
            CUDA) after a first eager call; ``True`` or a dict of ``torch.compile`` keywords.
            The solve then always makes ``iters`` products (see :mod:`bilevel._src.compiled`).
        autocast: ``torch.bfloat16`` (or ``torch.float16``): build the inner gradient graph
            under ``torch.autocast``, so the Hessian products run in that precision while the
            solver accumulates in the params' dtype (opt-in; ``benchmarks/precision.py``
            measures the accuracy cost).

    Assumes ``H`` is symmetric positive definite; pᵀHp ≤ 0 stops the solve and is reported
    in ``stats.negative_curvature`` (with a warning). On CUDA the host reads each iteration's
    numbers while the next one is already queued, so the device never waits for it; a solve
    that stops early then spends one more product, counted in ``stats.hvps``.
    """

    name: ClassVar[str] = "implicit-cg"
    iters: int = 50
    tol: float = 1e-6
    damping: float = 0.0
    warm_start: bool = False
    compile: bool | dict = False
    autocast: torch.dtype | None = None
    _previous: Tensors | None = field(default=None, init=False, repr=False)
    _fast: CompiledPath | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("iters", self.iters, integer=True)
        check_positive("tol", self.tol, allow_zero=True)
        check_positive("damping", self.damping, allow_zero=True)
        check_flag("warm_start", self.warm_start)
        check_autocast(self.autocast)
        self._fast = compiled_path(implicit_program, self.compile)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)
        if self._fast is not None:
            x0 = self._start(problem.theta0)
            out = self._fast(problem, self.autocast, _solve_on_device, self.iters, self.tol, self.damping, x0)
            if out is not None:
                grads, x, info = out
                products = self.iters + int(x0 is not None)
                result = conjugate_gradient_report(SolveResult(x, products, self.iters, info=info), self.tol)
                self._remember(x, bool(result.converged))
                return finish_compiled(result, grads, stats, products, _SOLVE)

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            result = conjugate_gradient(
                operator.matvec, v, self.iters, self.tol, self.damping, x0=self._start(v)
            )
            self._remember(result.x, bool(result.converged))
            return result

        return implicit_hypergradient(problem, solve, stats, self.autocast)

    def _start(self, like: Tensors) -> Tensors | None:
        x0 = self._previous if self.warm_start else None
        return x0 if x0 is not None and [t.shape for t in x0] == [t.shape for t in like] else None

    def _remember(self, x: Tensors, converged: bool) -> None:
        if self.warm_start:  # only a solve that converged is a good start for the next one
            self._previous = tuple(t.detach() for t in x) if converged else None

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self._previous} if self._previous is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._previous = state.get("previous")

    def state_fits_one_layout(self) -> bool:
        return self.warm_start and self._previous is not None  # unused otherwise


def _solve_on_device(
    operator: StationarityJacobian, v: Tensors, iters: int, tol: float, damping: float, x0: Tensors | None
) -> SolveResult:
    """The compiled program's solve: the same CG, without host synchronisation."""
    return conjugate_gradient(operator.matvec, v, iters, tol, damping, x0=x0, sync=False)
