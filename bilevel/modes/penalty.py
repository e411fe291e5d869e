"""``penalty``: the fully first-order penalty (value-function) estimate, no second derivatives.

With z = params (≈ argmin_θ f(θ, φ)) and y ≈ argmin_θ [f + g/λ](θ, φ), the hypergradient is
estimated as ``∇φ g(y, φ) + λ [∇φ f(y, φ) − ∇φ f(z, φ)]`` (F2SA, Kwon et al., ICML 2023;
ScaleBiO), from first-order gradients only: it runs on models whose ops have no double backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._src.errors import check_finite
from .._src.implicit import outer_gradients
from .._src.problem import BilevelProblem
from .._src.stats import Stats
from .._src.tree_math import axpy, dot, norm, scale
from .._src.typing import Tensors
from ._backends import Stepper, check_supported, make_stepper
from ._optimizer_options import (
    DEFAULT_LR,
    check_inner_optimizer,
    split_mode_options,
    split_settings,
)
from .base import Mode, check_flag, check_positive, register_mode

__all__ = ["Penalty"]

_OBJECTIVE = "inner_loss + outer_loss/penalty"
#: the breakdown of a call whose params are too far from the inner minimum for the penalty
PARAMS_NOT_AT_MINIMUM = "params_not_at_minimum"


@register_mode
@dataclass
class Penalty(Mode):
    """First-order hypergradients from the penalty reformulation of the bilevel problem.

    With z = params, assumed ≈ θ*(φ) = argmin_θ f(θ, φ), and y the minimiser of
    ``h = f + g/λ`` (the minimiser of g + λf, scaled so that one step size fits every λ),

        dg/dφ ≈ ∇φ g(y, φ) + λ [∇φ f(y, φ) − ∇φ f(z, φ)] = λ [∇φ h(y, φ) − ∇φ f(z, φ)].

    This is exactly (Danskin) the gradient of the value-function penalty
    ``L_λ(φ) = min_θ [g + λf] − λ min_θ f``, and ``L_λ(φ) = g(θ*, φ) − (1/2λ) ∇θgᵀ H⁻¹ ∇θg +
    O(1/λ²)`` (expand g + λf around θ*; H = ∇²θθ f): the correction is a smooth function of
    φ times 1/λ, so its derivative, the bias, is O(1/λ). Assumes f strongly convex in θ near
    θ*, with bounded third derivatives. No double backward anywhere: each step is one
    first-order gradient of h, and the hypergradient two more gradients at z.

    Accuracy needs y tight: the estimate multiplies y's error by λ. Its measure is the
    relative stationarity ``r = ‖λ ∇θh(y)‖ / ‖∇θg(z)‖`` = ‖λ∇θf(y) + ∇θg(y)‖ / ‖∇θg(z)‖, the
    analogue of CG's ‖v − Hx‖/‖v‖ for x = λ(z − y) ≈ H⁻¹∇θg, and about the relative error
    that y adds to the hypergradient. ``stats.converged`` is ``r ≤ tol``; otherwise the call
    warns (``stats.breakdown = "not_converged"``; ``strict=True`` raises), and a residual
    that grew over the steps is ``stats.diverged``. params' own error counts the same way,
    times λ: ``stats.extra["params_residual"] = λ‖∇θf(z)‖/‖∇θg(z)‖``. The mode does not move
    z, so it only checks it: ``params_residual > 1/λ`` (z's error then outweighs the O(1/λ)
    bias) sets ``stats.converged = False`` and warns (``stats.breakdown =
    "params_not_at_minimum"``, unless y's own breakdown came first): train params closer, or
    lower λ. Where ∇θg(z) = 0, y = z exactly: no steps are taken, the estimate is ∇φg(z), r
    is 0 and converged (params_residual is not checked: the answer is λ-free). Rounding:
    y − z and ∇φf(y) − ∇φf(z) are O(1/λ), so they keep about −log₁₀(λ·eps) digits; in float32
    r stalls near a level that grows with λ (6e-5 at λ = 1e3 on a small ridge problem): there
    keep λ ≤ 1e3 and tol ≥ 1e-4.

    ``stats``: ``iters`` the steps taken, ``residual`` the final r, ``hvps`` 0; in ``extra``
    ``gradient_evaluations`` (backward passes: one at each y visited, one for ∇φh when the
    steps stop early, two at z), ``initial_residual`` (r at y₀), ``params_residual``,
    ``penalty`` and ``warm_started``.

    Options:
        penalty: λ > 0 (default 100): bias O(1/λ), y's and params' errors times λ.
        steps: at most this many inner optimizer steps on h from y₀ (default 500); they stop
            once r ≤ tol.
        tol: the stationarity tolerance on r (default 1e-4).
        inner_optimizer: a torch optimizer class (or ``functools.partial`` of one) whose own
            keywords (``lr``, ``momentum``, ...) are passed to ``HyperGradient`` directly, or a
            torchopt ``GradientTransformation`` (torchopt backend; settings are numbers, or
            hparams tensors/callables read at their values: nothing is differentiated through
            them). Default ``torch.optim.SGD`` with ``lr=0.1`` and ``momentum=0.9``.
        warm_start: start y at ``z − x/λ`` with the previous call's x = λ(z − y): the offset,
            not y itself, so the start stays good when params move between calls of an online
            loop, and λ-free, so it survives a change of ``penalty``. Kept when the call made
            progress (r fell); the optimizer state starts fresh each call.
    """

    name: ClassVar[str] = "penalty"
    penalty: float = 100.0
    steps: int = 500
    tol: float = 1e-4
    inner_optimizer: Any = None
    warm_start: bool = False
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    _offset: Tensors | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_positive("penalty", self.penalty)
        check_positive("steps", self.steps, integer=True)
        check_positive("tol", self.tol, allow_zero=True)
        check_flag("warm_start", self.warm_start)
        if self.inner_optimizer is None:
            self.inner_optimizer = torch.optim.SGD
            self.optimizer_options = {"lr": DEFAULT_LR, "momentum": 0.9, **self.optimizer_options}
        check_inner_optimizer(self.inner_optimizer)
        check_supported(self.inner_optimizer, "torchopt")

    @classmethod
    def option_names(cls) -> list[str]:
        return [n for n in super().option_names() if n != "optimizer_options"]

    @classmethod
    def from_options(cls, **options: Any) -> Penalty:
        """Split the mode's own options from the inner optimizer's keywords (as the unrolled
        modes do); a keyword neither knows raises ``TypeError`` listing both."""
        own, rest = split_mode_options(cls.name, cls.option_names(), options)
        return cls(**own, optimizer_options=rest)

    def check_problem(self, problem: BilevelProblem) -> None:
        super().check_problem(problem)  # a non-symmetric map: the library's common refusal
        if problem.stationarity_map is not None or "stationarity" in type(problem).redefined:
            raise ValueError(
                f"mode {self.name!r} minimises {_OBJECTIVE} by gradient steps, so it needs the "
                "inner loss itself, but this problem defines θ* by a stationarity map of its "
                "own; use an implicit mode (implicit-cg for a symmetric map)"
            )

    # ------------------------------------------------------------------------- the call
    def hypergradient(self, problem: BilevelProblem, stats: Stats) -> Tensors:
        self.check_problem(problem)
        lam = float(self.penalty)
        z, phi = problem.leaf_copies()
        with torch.enable_grad():
            f_theta, f_phi = _inner_gradients(problem, z, phi)
            g_theta, g_phi = outer_gradients(problem, z, phi)
        stats.extra["hparams_unused_by_inner"] = all(g is None for g in f_phi)
        size = float(norm(g_theta))  # ‖∇θ g(z)‖: what r is relative to
        if size == 0.0:  # ∇θh(z) = ∇θf(z): y = z, and λ[∇φh(z) − ∇φf(z)] = ∇φg(z), exactly
            return self._direct(g_phi, f_theta, phi, lam, stats)
        start = self._start(z, lam)
        y, h_phi, residuals, evaluations = self._minimise(
            problem, z if start is None else start, phi, lam, size
        )
        grads = tuple(
            lam * (a - (0.0 if b is None else b)) for a, b in zip(h_phi, f_phi)
        )  # λ[∇φh(y) − ∇φf(z)]; where f ignores a φ leaf, ∇φf(z) = 0
        check_finite(grads, "the penalty hypergradient λ[∇φh(y) − ∇φf(z)]")
        self._report(stats, residuals, evaluations + 2, lam, start is not None)
        stats.extra["params_residual"] = _relative(lam * float(norm(f_theta)), size)
        self._check_params(stats, lam)
        if self.warm_start and residuals[-1] <= residuals[0]:  # progress: a better start than z
            self._offset = tuple(t.detach() for t in scale(lam, axpy(-1.0, y, z)))
        return grads

    def _direct(
        self, g_phi: tuple[Tensor | None, ...], f_theta: Tensors, phi: Tensors, lam: float, stats: Stats
    ) -> Tensors:
        """∇θg(z) = 0: no steps, y = z, and the estimate is ∇φg(z) (zero where g ignores a φ
        leaf), from the two gradients at z already made. r is 0; ``params_residual``
        (relative to ‖∇θg(z)‖ = 0) is reported but not checked: the answer is λ-free, z's
        error enters it as it enters an implicit mode's."""
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(g_phi, phi))
        self._report(stats, [0.0], 2, lam, False)
        stats.extra["params_residual"] = _relative(lam * float(norm(f_theta)), 0.0)
        return grads

    def _minimise(
        self, problem: BilevelProblem, y: Tensors, phi: Tensors, lam: float, size: float
    ) -> tuple[Tensors, Tensors, list[float], int]:
        """y after the steps on h = f + g/λ, ∇φh there, r at every y visited, and the
        gradient evaluations made. Steps go through a non-differentiable stepper: each is
        given the linear surrogate ⟨∇θh(y), θ⟩, whose gradient is the ∇θh just computed."""
        stepper = self._stepper(problem, phi, y)
        state, residuals, evaluations = stepper.init(y), [], 0
        y = tuple(t.detach().requires_grad_() for t in y)
        with torch.enable_grad():
            for step in range(self.steps + 1):
                last = step == self.steps
                h = self._objective(problem, y, phi, lam, step)
                grads = torch.autograd.grad(
                    h, y + (phi if last else ()), retain_graph=not last, allow_unused=True
                )
                evaluations += 1
                h_theta = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, y))
                residuals.append(_stationarity(h_theta, lam, size, step))
                if last or residuals[-1] <= self.tol or not math.isfinite(residuals[-1]):  # overflow
                    break
                surrogate = dot([g.detach() for g in h_theta], y)
                y, state = stepper.advance(surrogate, y, state, False, step == 0)
                y = tuple(t.detach().requires_grad_() for t in y)
            if not last:  # stopped early: ∇φh from the graph kept for it
                grads = y + torch.autograd.grad(h, phi, allow_unused=True)
                evaluations += 1
        h_phi = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads[len(y) :], phi))
        return y, h_phi, residuals, evaluations

    def _stepper(self, problem: BilevelProblem, phi: Tensors, y: Tensors) -> Stepper:
        """The inner optimizer at its settings' values (hparams among them are read, not
        differentiated: the minimiser y does not depend on how it is reached)."""
        options, hyper = split_settings(problem, phi, self.optimizer_options)
        detached = {k: v.detach() for k, v in hyper.items()}
        return make_stepper("torchopt", self.inner_optimizer, options, detached, y)

    @staticmethod
    def _objective(problem: BilevelProblem, y: Tensors, phi: Tensors, lam: float, step: int) -> Tensor:
        """h(y) = f(y) + g(y)/λ, checked. ``@once_differentiable`` Functions are harmless here
        (no double backward), so the inner loss is not screened for them."""
        f = problem.inner(y, phi, second_order=False)
        h = f + problem.outer(y, phi) / lam
        check_finite((h,), f"the value of {_OBJECTIVE} at penalty step {step}")
        return h

    def _report(self, stats: Stats, residuals: list[float], evaluations: int, lam: float, warm: bool) -> None:
        """Fill ``stats`` with what the steps did; a y that missed ``tol`` is a breakdown, so
        that ``HyperGradient`` warns (or raises with ``strict=True``)."""
        first, final = residuals[0], residuals[-1]
        stats.iters = len(residuals) - 1
        stats.hvps = 0  # first-order gradients only
        stats.residual = final
        stats.converged = final <= self.tol
        stats.extra.update(
            penalty=lam, gradient_evaluations=evaluations, initial_residual=first, warm_started=warm
        )
        if stats.converged:
            return
        if final > first:
            stats.diverged, stats.breakdown = True, "diverged"
            stats.breakdown_message = (
                f"the steps on {_OBJECTIVE} diverged: y's relative stationarity grew from "
                f"{first:.1e} to {final:.1e}; lower the inner optimizer's lr"
            )
            return
        stats.breakdown = "not_converged"
        stats.breakdown_message = (
            f"y, the minimiser of {_OBJECTIVE}, did not converge in {stats.iters} steps (relative "
            f"stationarity {final:.1e} > tol={self.tol:g}). The estimate multiplies y's error by "
            f"penalty={lam:g}, so it is inaccurate: raise steps or the inner optimizer's lr (or its "
            "momentum), or set warm_start=True in a loop"
        )

    @staticmethod
    def _check_params(stats: Stats, lam: float) -> None:
        """params_residual > 1/λ: z's error, times λ, outweighs the O(1/λ) bias; a breakdown
        (a y that missed ``tol`` or diverged is reported first)."""
        params = stats.extra["params_residual"]
        if params <= 1.0 / lam:
            return
        stats.converged = False
        if stats.breakdown is not None:
            return
        stats.breakdown = PARAMS_NOT_AT_MINIMUM
        stats.breakdown_message = (
            f"params is not close enough to a minimum of inner_loss for penalty={lam:g}: "
            f"params_residual = penalty·‖∇θ inner_loss‖/‖∇θ outer_loss‖ = {params:.1e} > "
            f"1/penalty = {1.0 / lam:.1e}, and the estimate multiplies params' gradient by the "
            "penalty, so it is inaccurate. Train params closer to the inner minimum, use a "
            "smaller penalty, or use an implicit mode (implicit-cg), which does not multiply it"
        )

    # ---------------------------------------------------------------------- the warm start
    def _start(self, z: Tensors, lam: float) -> Tensors | None:
        """y₀ = z − x/λ from the previous call's offset x, when it applies."""
        x = self._offset if self.warm_start else None
        if x is None or [t.shape for t in x] != [t.shape for t in z]:
            return None
        return axpy(-1.0 / lam, x, tuple(t.detach() for t in z))

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self._offset} if self._offset is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._offset = state.get("offset")

    def state_fits_one_layout(self) -> bool:
        return self.warm_start and self._offset is not None  # unused otherwise


def _inner_gradients(problem: BilevelProblem, z: Tensors, phi: Tensors) -> tuple[Tensors, tuple]:
    """(∇θf(z), ∇φf(z)) in one backward pass; None in ∇φf where f ignores a φ leaf. A params
    tensor that f ignores is refused: h would not be strongly convex in it."""
    f = problem.inner(z, phi, second_order=False)
    check_finite((f,), "the value of inner_loss")
    grads = torch.autograd.grad(f, z + phi, allow_unused=True)
    for i, (g, t) in enumerate(zip(grads, z)):
        if g is None:
            where = f"params[{i}]" if len(z) > 1 else "params"
            raise ValueError(
                f"{where} (shape {tuple(t.shape)}) does not affect inner_loss, so it has no "
                "minimiser to move towards; leave it out of params, or make sure inner_loss uses "
                "the params it receives"
            )
    check_finite(grads[: len(z)], "the gradient of inner_loss w.r.t. params")
    return tuple(grads[: len(z)]), grads[len(z) :]


def _stationarity(h_theta: Tensors, lam: float, size: float, step: int) -> float:
    """r = ‖λ∇θh(y)‖/‖∇θg(z)‖ (one host read a step); a NaN or inf in ∇θh raises, naming the step."""
    r = _relative(lam * float(norm(h_theta)), size)
    if not math.isfinite(r):
        check_finite(h_theta, f"the gradient of {_OBJECTIVE} at penalty step {step}")
    return r


def _relative(value: float, size: float) -> float:
    """value / size, with 0/0 = 0 (g ignores θ and y did not move: nothing to solve)."""
    if size > 0:
        return value / size
    return 0.0 if value == 0 else math.inf
