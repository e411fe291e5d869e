"""``implicit-cg``: IFT with the Hessian system solved by conjugate gradient."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._src.compiled import CompiledPath, compiled_path
from .._src.implicit import check_autocast, finish_compiled, implicit_hypergradient, implicit_program
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import (
    SolveResult,
    conjugate_gradient,
    conjugate_gradient_report,
    damping_ramp,
    power_iteration,
)
from .._src.stats import Stats
from .._src.typing import Tensors
from ._kept_sketch import KeptSketch
from ._warm_start import WarmStarted
from .base import ImplicitMode, check_flag, check_positive, register_mode

__all__ = ["ImplicitCG"]


_SOLVE = "the conjugate-gradient solve (a Hessian-vector product)"
_ZERO_CURVATURE = (
    "damping='auto': the inner Hessian is zero along the power iteration; set damping explicitly"
)
#: damping="auto" starts at this fraction of the estimated λmax and grows by this factor
_RAMP_START, _RAMP_GROWTH = 1e-2, 4.0
PRECONDITIONERS = (None, "nystrom")


@register_mode
@dataclass
class ImplicitCG(WarmStarted, ImplicitMode):
    """Solve ``(H + damping·I) x = ∂g/∂θ`` by conjugate gradient.

    Options:
        iters: at most this many Hessian-vector products (default 50).
        tol: stop when ‖r‖ ≤ tol·‖∂g/∂θ‖ (default 1e-6).
        damping: λ ≥ 0 added to the diagonal; a small λ regularises ill-conditioned or
            slightly indefinite Hessians at the price of bias (default 0). ``"auto"``: for
            Hessians that may be indefinite: undamped CG first; only where it meets negative
            curvature, a ramp with the rest of the ``iters`` CG products: λ = 1e-2·λ̂max
            (λ̂max from ``power_iters`` power iterations), multiplied by 4 and CG restarted
            from zero at each negative curvature. ``stats.hvps`` and ``stats.iters`` count
            the undamped attempt too. The λ used is in ``stats.extra["damping"]`` (0.0 where
            undamped CG sufficed: then the answer is damping=0's), λ̂max in
            ``stats.extra["lambda_max"]`` (only where it was estimated). A damped answer,
            ``(H + λI)⁻¹∂g/∂θ``, is bounded but biased wherever λ is not small against the
            curvatures that matter. Where the undamped attempt meets negative curvature only
            at the budget's last product, its iterate is returned, with the breakdown.
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
        reorthogonalize: keep the normalised residuals (``iters`` vectors of size P) and
            project each new residual against them. In floating point CG's residuals lose
            their orthogonality and it searches the same directions again, which on
            ill-conditioned systems is most of its products: to 1e-6 at κ = 1e4 it then
            needs about half the products of plain CG, at κ = 1e6 a fifth
            (``benchmarks/krylov.py``), and as many at κ = 1e2; one more product measures
            the true residual. Default False, for its memory.
        power_iters: power iterations that estimate λmax for ``damping="auto"`` (default 10).
        preconditioner: ``"nystrom"``: preconditioned CG with the randomized Nyström
            preconditioner of ``H + damping·I`` (Frangella, Tropp and Udell, 2023; see
            :func:`~bilevel._src.solvers.nystrom.nystrom_preconditioner`) from a Gaussian sketch of
            ``rank`` products. It flattens the ``rank`` largest eigenvalues, so it pays when
            a few large eigenvalues set the condition number: 1.5-3x fewer products than CG
            at κ = 1e4 on a 1/j² spectrum, 1.1x at κ = 1e2, and under 1.1x on a log-uniform
            spectrum, where no few eigenvalues stand out (``benchmarks/pcg.py``). The sketch
            is kept and reused across calls, as the warm start is (a changed params layout
            is refused, as for it), and counted in ``stats.hvps`` on the call that makes it;
            it is made again every ``refresh`` calls, or after a call where PCG needed more
            than 1.5x the iterations of the sketch's first call.
            ``stats.extra["preconditioner"]`` says what it did (rank, refreshed, λ̂ range).
            Default None (plain CG). Not with ``compile``, ``reorthogonalize`` or
            ``damping="auto"``.
        rank: the sketch's number of products k for ``preconditioner="nystrom"`` (default 20;
            capped at P).
        refresh: make a new sketch after this many calls with one (default 50).

    Assumes ``H`` is symmetric positive definite; pᵀHp ≤ 0 stops the solve and is reported
    in ``stats.negative_curvature`` (with a warning). The result is then the iterate with
    the smallest residual, as it is when the last iterate's residual exceeds ‖∂g/∂θ‖ (its
    iteration in ``stats.extra["min_residual_iterate"]``); for an indefinite ``H`` use
    ``damping="auto"`` (a damped answer) or ``implicit-minres`` (the undamped one). On CUDA
    the host reads each iteration's numbers while the next one is already queued, so the
    device never waits for it; a solve that stops early then spends one more product,
    counted in ``stats.hvps``.

    Also ``hvp`` and ``fd_eps``, as every implicit mode (:class:`~bilevel.modes.base.ImplicitMode`).
    """

    name: ClassVar[str] = "implicit-cg"
    iters: int = 50
    tol: float = 1e-6
    damping: float | str = 0.0
    warm_start: bool = False
    compile: bool | dict = False
    autocast: torch.dtype | None = None
    reorthogonalize: bool = False
    power_iters: int = 10
    preconditioner: str | None = None
    rank: int = 20
    refresh: int = 50
    _previous: Tensors | None = field(default=None, init=False, repr=False)
    _kept: KeptSketch = field(init=False, repr=False)
    _fast: CompiledPath | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("iters", self.iters, integer=True)
        check_positive("tol", self.tol, allow_zero=True)
        if isinstance(self.damping, str) and self.damping != "auto":
            raise ValueError(f"option damping must be a number >= 0 or 'auto', got {self.damping!r}")
        if self.damping != "auto":
            check_positive("damping", self.damping, allow_zero=True)
        check_flag("warm_start", self.warm_start)
        check_flag("reorthogonalize", self.reorthogonalize)
        check_positive("power_iters", self.power_iters, integer=True)
        check_autocast(self.autocast, self.rule)
        self._check_preconditioner()
        self._kept = KeptSketch(self.rank, self.refresh)
        if self.compile is not False and (self.damping == "auto" or self.reorthogonalize):
            raise ValueError(
                "compile does not support damping='auto' or reorthogonalize=True (both decide on "
                "the host between products); use compile=False with them, or a fixed damping"
            )
        self._fast = compiled_path(implicit_program, self.compile)

    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)
        if self._fast is not None:
            x0 = self._start(problem.theta0)
            out = self._fast(
                problem, self.autocast, self.rule, _solve_on_device, self.iters, self.tol, self.damping, x0
            )
            if out is not None:
                grads, x, info = out
                products = self.iters + 1 + int(x0 is not None)  # and the true residual's product
                result = conjugate_gradient_report(SolveResult(x, products, self.iters, info=info), self.tol)
                self._remember(x, bool(result.converged))
                return finish_compiled(result, grads, stats, products, _SOLVE, self.rule)

        def solve(operator: StationarityJacobian, v: Tensors) -> SolveResult:
            if self.damping == "auto":
                result = self._ramp(operator, v, stats)
            else:
                result = conjugate_gradient(
                    operator.matvec,
                    v,
                    self.iters,
                    self.tol,
                    float(self.damping),
                    x0=self._start(v),
                    reorthogonalize=self.reorthogonalize,
                    preconditioner=self._precondition(operator, v, stats),
                )
                if self.preconditioner is not None:
                    self._kept.age(result.iters)
            if result.iterate is not None and result.iterate != result.iters:  # the best, not the last
                stats.extra["min_residual_iterate"] = result.iterate
            self._remember(result.x, bool(result.converged))
            return result

        return implicit_hypergradient(problem, solve, stats, self.autocast, self.rule)

    def _ramp(self, operator: StationarityJacobian, v: Tensors, stats: Stats) -> SolveResult:
        """``damping="auto"``: undamped CG, then, only where it meets negative curvature, the
        ramp from 1e-2·λ̂max with the rest of the budget (see the class docstring)."""
        x0 = self._start(v)
        undamped = conjugate_gradient(
            operator.matvec, v, self.iters, self.tol, 0.0, x0=x0, reorthogonalize=self.reorthogonalize
        )
        left = self.iters - undamped.products
        if not undamped.negative_curvature or left <= 0:  # sufficed, or no budget left to damp
            stats.extra["damping"] = 0.0
            return undamped
        largest = power_iteration(operator.matvec, v, self.power_iters, torch.Generator().manual_seed(0))
        if largest == 0.0:
            raise ValueError(_ZERO_CURVATURE)
        result, damping = damping_ramp(
            operator.matvec,
            v,
            left,
            self.tol,
            _RAMP_START * largest,
            _RAMP_GROWTH,
            x0=x0,
            reorthogonalize=self.reorthogonalize,
        )
        result.products += undamped.products
        result.iters += undamped.iters
        stats.extra["lambda_max"], stats.extra["damping"] = largest, damping
        return result

    def _check_preconditioner(self) -> None:
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"option preconditioner must be None or 'nystrom', got {self.preconditioner!r}")
        check_positive("rank", self.rank, integer=True)
        check_positive("refresh", self.refresh, integer=True)
        if self.preconditioner is None:
            return
        clashes = [
            name
            for name, clash in (
                ("compile", self.compile is not False),
                ("reorthogonalize=True", self.reorthogonalize),
                ("damping='auto'", self.damping == "auto"),
            )
            if clash
        ]
        if clashes:
            raise ValueError(
                f"preconditioner='nystrom' does not combine with {' or '.join(clashes)}: PCG runs on "
                "the host loop, its projections would need the preconditioner's inner product, and "
                "the preconditioner is built for one damping; use compile=False, "
                "reorthogonalize=False and a fixed damping with it"
            )

    def _precondition(
        self, operator: StationarityJacobian, v: Tensors, stats: Stats
    ) -> Callable[[Tensors], Tensors] | None:
        """The Nyström preconditioner of ``H + damping·I`` (None without one)."""
        if self.preconditioner is None:
            return None
        return self._kept.preconditioner(operator.matmat, v, float(self.damping), stats)

    def state_dict(self) -> dict[str, Any]:
        return {**self._warm_state(), **self._kept.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_warm_state(state)
        self._kept.load_state_dict(state)

    def state_fits_one_layout(self) -> bool:
        kept = self.preconditioner is not None and self._kept.sketch is not None
        return self._warm_state_used() or kept  # a state the options leave unused binds nothing


def _solve_on_device(
    operator: StationarityJacobian, v: Tensors, iters: int, tol: float, damping: float, x0: Tensors | None
) -> SolveResult:
    """The compiled program's solve: the same CG, without host synchronisation."""
    return conjugate_gradient(operator.matvec, v, iters, tol, float(damping), x0=x0, sync=False)
