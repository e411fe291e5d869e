"""Implicit differentiation (IFT) around a stationary point, written once for every mode.

    dg/dφ = ∂g/∂φ − (∂G/∂φ)ᵀ x,   Jᵀ x = ∂g/∂θ,   J = ∂G/∂θ,

with ``G = ∇θ f`` (so ``Jᵀ = H`` and ``(∂G/∂φ)ᵀ = ∇²φθ f``) unless the problem supplies
another stationarity map. Assumes ``θ`` is (close to) a point where ``G(θ, φ) = 0``.

A call is a :class:`Linearization` at (θ, φ) (the right-hand side ∂g/∂θ, the direct term
∂g/∂φ and the product operator), a linear solve with that operator, and :func:`combine`.
The eager path linearizes with autograd (:func:`linearize`), the compiled path with
``torch.func`` (:func:`linearize_traced`); both then run the same solvers and ``combine``.
With ``ProductRule("finite-difference")`` both linearize from first-order gradients only
(:meth:`StationarityJacobian.from_differences`): no second derivative is taken anywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import check_finite, deferred_finite_checks
from .problem import BilevelProblem
from .products import ProductRule, StationarityJacobian, Wrt
from .solvers import SolveResult
from .stats import Stats
from .tree_math import axpy, scale
from .typing import Tensors

__all__ = [
    "AUTOGRAD",
    "LOW_PRECISION",
    "Linearization",
    "Solve",
    "check_autocast",
    "check_differences",
    "combine",
    "difference_operator",
    "finish_compiled",
    "implicit_hypergradient",
    "implicit_program",
    "linearize",
    "linearize_traced",
    "low_precision",
    "outer_gradients",
    "record_rule",
    "record_stationarity",
    "same_random_numbers",
    "subtract_mixed",
]

#: ``solve(operator, v) -> SolveResult``: ``x ≈ (Jᵀ)⁻¹ v`` from products with ``operator``
Solve = Callable[[StationarityJacobian, Tensors], SolveResult]
LOW_PRECISION = (torch.bfloat16, torch.float16)
AUTOGRAD = ProductRule()


@dataclass
class Linearization:
    """What the IFT needs at (θ, φ): ``v = ∂g/∂θ``, the direct term ``∂g/∂φ`` (None where
    ``g`` does not depend on a tensor) and the operator of ``Jᵀ`` and ``(∂G/∂φ)ᵀ``."""

    operator: StationarityJacobian
    v: Tensors
    direct: tuple[Tensor | None, ...]
    #: the value of ``G`` (∇θ f) at (θ, φ) where the linearization computed it, detached
    gradient: Tensors = ()


def combine(linearization: Linearization, x: Tensors) -> Tensors:
    """The hypergradient ``∂g/∂φ − (∂G/∂φ)ᵀ x`` for the solution ``x`` of ``Jᵀ x = ∂g/∂θ``."""
    return subtract_mixed(linearization.direct, linearization.operator.mixed(x))


def subtract_mixed(direct: Sequence[Tensor | None], mixed: Tensors) -> Tensors:
    """``∂g/∂φ − (∂G/∂φ)ᵀx`` leaf-wise, ``−(∂G/∂φ)ᵀx`` where there is no direct term."""
    if all(d is None for d in direct):
        return scale(-1.0, mixed)
    if all(d is not None for d in direct):
        return axpy(-1.0, mixed, direct)  # type: ignore[arg-type]
    return tuple(-m if d is None else d - m for d, m in zip(direct, mixed))


def check_autocast(value: object, rule: ProductRule = AUTOGRAD) -> None:
    """Validate an ``autocast`` option (and its combination with the product rule)."""
    if value is not None and value not in LOW_PRECISION:
        raise TypeError(f"option autocast must be None, torch.bfloat16 or torch.float16, got {value!r}")
    if value is not None and rule.first_order:
        raise ValueError(
            "autocast with hvp='finite-difference' would difference low-precision gradients, "
            "whose rounding (about 1e-2 relative in bfloat16) swamps the difference; use one of them"
        )


def check_differences(problem: BilevelProblem, rule: ProductRule) -> None:
    """Refuse finite-difference products where they would compute the wrong matrix, or noise."""
    if not rule.first_order:
        return
    if problem.symmetric and problem.stationarity_map is not None:
        raise ValueError(
            "hvp='finite-difference' differences the gradient of inner_loss, but this problem "
            "has none: its inner solution is stated by a map of its own (bilevel.Root or a "
            "stationarity map); use hvp='autograd'"
        )
    if not problem.symmetric or "stationarity" in problem.redefined:
        raise ValueError(
            "hvp='finite-difference' differences the gradient of inner_loss, which gives J x, "
            "but this problem's stationarity map is not a gradient, so its implicit system needs "
            "Jᵀx (J is not symmetric); use hvp='autograd'"
        )
    step, eps = rule.relative_step(problem.dtype), torch.finfo(problem.dtype).eps
    if step <= eps:
        raise ValueError(
            f"fd_eps={step:g} is below the rounding of {problem.dtype} ({eps:.1e}): the "
            "differences would be noise; use the default (None: the cube root of the machine "
            "epsilon) or a larger step"
        )


def low_precision(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device`` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def outer_gradients(
    problem: BilevelProblem, theta: Tensors, phi: Tensors
) -> tuple[Tensors, tuple[Tensor | None, ...]]:
    """``(∂g/∂θ, ∂g/∂φ)`` at the given leaves: zeros in ``∂g/∂θ`` where ``g`` does not depend
    on a tensor, None in ``∂g/∂φ`` (no direct term to add)."""
    with torch.enable_grad():
        g = problem.outer(theta, phi)
        check_finite((g,), "the value of outer_loss")
        grads = torch.autograd.grad(g, theta + phi, allow_unused=True)
    if all(x is None for x in grads):
        raise ValueError(
            "outer_loss depends on neither params nor hparams; compute it from the "
            "arguments the closure receives (or, for modules, by calling the module)"
        )
    v = tuple(torch.zeros_like(t) if x is None else x for x, t in zip(grads, theta))
    direct = grads[len(theta) :]
    check_finite(v, "the gradient of outer_loss w.r.t. params")
    check_finite(direct, "the gradient of outer_loss w.r.t. hparams")
    return v, direct


def same_random_numbers(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context that runs its block with the random state of now, and leaves the global
    state as it found it: every finite-difference evaluation of a loss that draws random
    numbers (dropout) then differences one function, not two random draws."""
    devices = [device] if device.type == "cuda" else []
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def replay() -> Iterator[None]:
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu)
            for d, state in zip(devices, cuda):
                torch.cuda.set_rng_state(state, d)
            yield

    return replay


def linearize(
    problem: BilevelProblem,
    theta: Tensors,
    phi: Tensors,
    autocast: torch.dtype | None = None,
    rule: ProductRule = AUTOGRAD,
) -> Linearization:
    """The eager linearization: the graph of ``G`` (under ``torch.autocast`` to ``autocast``,
    so every product runs its matmuls in that dtype) and the outer gradients; with a
    first-order ``rule``, the outer gradients and an operator of finite differences."""
    check_differences(problem, rule)
    # the outer gradients first: their graph is freed before the graph of G is built
    v, direct = outer_gradients(problem, theta, phi)
    if rule.first_order:
        return Linearization(difference_operator(problem, theta, phi, rule), v, direct)
    with low_precision(problem.device, autocast):
        field = problem.stationarity(theta, phi)
    operator = StationarityJacobian.from_field(field, theta, phi, lambda: problem.suspects(theta, phi))
    value = tuple(g.detach() for g in field if g is not None) if problem.symmetric else ()
    return Linearization(operator, v, direct, value)


def difference_operator(
    problem: BilevelProblem, theta: Tensors, phi: Tensors, rule: ProductRule
) -> StationarityJacobian:
    """The eager operator of finite differences of first-order gradients of ``inner_loss``,
    every evaluation with the random numbers of the call."""
    replay = same_random_numbers(problem.device)

    def gradient(point: Tensors, wrt: Wrt) -> Sequence[Tensor | None]:
        with torch.enable_grad(), replay():
            leaves = tuple(t.detach().requires_grad_() for t in point)
            f = problem.inner(leaves, phi, second_order=False)
            check_finite((f,), "the value of inner_loss at a finite-difference point")
            return torch.autograd.grad(f, leaves if wrt == "theta" else phi, allow_unused=True)

    return StationarityJacobian.from_differences(gradient, theta, phi, rule.relative_step(problem.dtype))


def linearize_traced(
    problem: BilevelProblem,
    theta: Tensors,
    phi: Tensors,
    buffers: dict[str, Tensor],
    autocast: torch.dtype | None = None,
    rule: ProductRule = AUTOGRAD,
) -> Linearization:
    """The same with ``torch.func`` (traceable): one ``vjp`` of ``∇θ f`` serves every Hessian
    product and the mixed product, reverse-over-reverse as in the eager path; with a
    first-order ``rule``, ``torch.func.grad`` of ``f`` at the finite-difference points."""

    def inner(th: Tensors, ph: Tensors) -> Tensor:
        return problem.call("inner_loss", th, ph, buffers=buffers).reshape(())

    def outer(th: Tensors, ph: Tensors) -> Tensor:
        return problem.call("outer_loss", th, ph, buffers=buffers).reshape(())

    v, direct = torch.func.grad(outer, argnums=(0, 1))(theta, phi)
    if rule.first_order:
        by_theta, by_phi = (torch.func.grad(inner, argnums=i) for i in (0, 1))

        def gradient(point: Tensors, wrt: Wrt) -> Sequence[Tensor | None]:
            return (by_theta if wrt == "theta" else by_phi)(point, phi)

        step = rule.relative_step(theta[0].dtype)
        operator = StationarityJacobian.from_differences(gradient, theta, phi, step)
        operator.checked = False  # compiled code checks after the call
        return Linearization(operator, v, direct)
    with low_precision(theta[0].device, autocast):
        vjp = torch.func.vjp(torch.func.grad(inner, argnums=0), theta, phi)[1]
    return Linearization(StationarityJacobian.from_vjp(vjp, theta, phi), v, direct)


def implicit_hypergradient(
    problem: BilevelProblem,
    solve: Solve,
    stats: Stats,
    autocast: torch.dtype | None = None,
    rule: ProductRule = AUTOGRAD,
) -> Tensors:
    """The IFT hypergradient with ``x`` from ``solve(operator, ∂g/∂θ)``; fills ``stats``.

    With ``autocast`` (bf16/fp16) the inner loss and its gradient graph are built under
    ``torch.autocast``; the products come out in the params' dtype, where the solver
    accumulates. ``rule`` says how the products are differentiated."""
    if autocast is not None and problem.dtype != torch.float32:
        raise ValueError(
            f"autocast={autocast} lowers the precision of float32 products, but params "
            f"are {problem.dtype}; use float32 params, or autocast=None"
        )
    theta, phi = problem.leaf_copies()
    # The NaN/inf checks of the setup and of the mixed product are read together when the
    # block ends: the setup's reads need not drain the device queue before the solve starts.
    # A solver error on a NaN that the setup made (a non-finite product) gives way to the
    # setup's error, which names where the NaN appeared.
    with deferred_finite_checks() as checks:
        linearization = linearize(problem, theta, phi, autocast, rule)
        result = solve(linearization.operator, linearization.v)
        grads = combine(linearization, result.x)
        if linearization.gradient:  # their norms come with the NaN checks' one read
            check_finite(linearization.gradient, _GRADIENT)
            check_finite(result.x, _SOLUTION)
            check_finite(theta, _PARAMS)
    stats.record(result, hvps=linearization.operator.products)
    record_stationarity(stats, checks.norms)
    stats.extra["hparams_unused_by_inner"] = all(linearization.operator.unused)
    record_rule(stats, rule, problem.dtype, linearization.operator.evaluations)
    return grads


_GRADIENT, _SOLUTION, _PARAMS = "the gradient of inner_loss w.r.t. params", "the solution x", "params"
_OUTER = "the gradient of outer_loss w.r.t. params"
#: the estimated distance from a minimiser, relative to ‖params‖, above which a call warns
FAR_FROM_STATIONARY = 0.1


def record_stationarity(stats: Stats, norms: dict[str, float]) -> None:
    """How far params is from a stationary point of inner_loss, from norms the call read
    anyway: ``inner_gradient_norm`` = ‖∇θ f‖, and ``stationarity`` = s / (‖θ‖ + s) in [0, 1),
    with s = ‖∇θ f‖·‖x‖/‖∂g/∂θ‖ an estimate of the Newton step to the minimiser, ‖H⁻¹∇θ f‖
    (H⁻¹ scaling ∇θ f by about as much as it scales ∂g/∂θ into x). The IFT assumes it is 0;
    0.1 is a step of about a tenth of ‖θ‖."""
    if _GRADIENT not in norms:
        return
    gradient, solution, outer, params = (norms.get(k, 0.0) for k in (_GRADIENT, _SOLUTION, _OUTER, _PARAMS))
    stats.extra["inner_gradient_norm"] = gradient
    if outer > 0:
        step = gradient * solution / outer
        stats.extra["stationarity"] = step / (params + step) if step > 0 else 0.0


def record_rule(stats: Stats, rule: ProductRule, dtype: torch.dtype, evaluations: int) -> None:
    """Note finite-difference products in ``stats``: the relative step and the gradient
    evaluations they made (two per product)."""
    if rule.first_order:
        stats.extra["hvp"] = rule.hvp
        stats.extra["fd_eps"] = rule.relative_step(dtype)
        stats.extra["gradient_evaluations"] = evaluations


def implicit_program(
    problem: BilevelProblem,
    theta: Tensors,
    phi: Tensors,
    buffers: dict[str, Tensor],
    autocast: torch.dtype | None,
    rule: ProductRule,
    solve: Callable[..., SolveResult],
    *args: Any,
) -> tuple[Tensors, Tensors, dict[str, Tensor]]:
    """``(dg/dφ, x, info)`` with ``x`` from ``solve(operator, ∂g/∂θ, *args)``, a solve without
    host synchronisation, as one traceable function for the compiled path."""
    linearization = linearize_traced(problem, theta, phi, buffers, autocast, rule)
    result = solve(linearization.operator, linearization.v, *args)
    return combine(linearization, result.x), result.x, result.info


def finish_compiled(
    result: SolveResult,
    grads: Tensors,
    stats: Stats,
    hvps: int,
    solve: str = "the linear solve (a Hessian-vector product)",
    rule: ProductRule = AUTOGRAD,
) -> Tensors:
    """Check and report a compiled call (``solve`` names the solve in a NaN error): its
    solve's host numbers in ``result``."""
    with deferred_finite_checks():
        check_finite(result.x, solve)
        check_finite(grads, "the mixed second-derivative product ∇²φθ f · x")
    stats.record(result, hvps=hvps)
    stats.extra["compiled"] = True
    record_rule(stats, rule, grads[0].dtype, 2 * (hvps + 1))  # the products and the mixed one
    return grads
