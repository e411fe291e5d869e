"""Unrolled modes on a ``bilevel.FixedPoint``: the iteration is the map itself.

θ_{t+1} = T(θ_t, φ) for t < steps from θ_0 = params, and dg(θ_steps, φ)/dφ by backpropagation
through the last ``graph_steps`` of them (earlier ones are detached). The inner optimizer
does not take part: its options are refused. A ``bilevel.Root`` states no iteration, so
unrolled modes refuse it, naming the implicit modes.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from .._src.conditions import ConditionProblem, Root
from .._src.errors import check_finite, deferred_finite_checks, second_order_guard
from .._src.memory import SavedTensorMemory
from .._src.stats import Stats
from .._src.typing import Tensors
from ._optimizer_options import DEFAULT_LR
from .base import available_modes, get_mode

if TYPE_CHECKING:
    from ._unrolled import UnrolledMode

__all__ = ["unroll_condition"]


def unroll_condition(mode: UnrolledMode, problem: ConditionProblem, stats: Stats) -> Tensors:
    """The unrolled hypergradient of a ``FixedPoint`` problem; fills ``stats``."""
    if isinstance(problem.condition, Root):
        raise ValueError(_root_refusal(mode.name, problem.condition.symmetric))
    _check_options(mode)
    if getattr(problem, "tied", None):  # the init as a hyperparameter: unroll_condition starts anew
        raise ValueError(
            "a bilevel.FixedPoint with the same tensors as params and hparams is not supported "
            "by unrolled modes: pass a separate copy as params (its fixed point does not depend "
            "on where the iteration starts)"
        )
    stats.iters = mode.steps
    stats.extra["graph_steps"] = mode.graph_steps()
    graph_from = mode.steps - mode.graph_steps()
    theta, phi = problem.leaf_copies()
    meter = SavedTensorMemory() if mode.measure_memory else None
    with deferred_finite_checks(), torch.enable_grad(), meter or contextlib.nullcontext():
        for step in range(mode.steps):
            if step <= graph_from:  # a fresh leaf: T may differentiate in θ (a gradient step)
                theta = tuple(t.detach().requires_grad_() for t in theta)
            theta = problem.fixed_point_step(theta, phi)
            check_finite(theta, f"T(params, hparams) at unrolled step {step}")
        outer = problem.outer(theta, phi)
        check_finite((outer,), "the value of outer_loss after the unrolled steps")
        with second_order_guard("backpropagating through the unrolled fixed-point steps"):
            grads = torch.autograd.grad(outer, phi, allow_unused=True)
        result = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, phi))
        check_finite(result, "the unrolled hypergradient")
    if mode.update_params:
        problem.write_back(theta)
    if meter is not None:
        stats.extra["saved_bytes_peak"] = meter.peak
    return result


def _check_options(mode: UnrolledMode) -> None:
    """Refuse the options that configure the inner optimizer's run, which T replaces."""
    default = mode.inner_optimizer is torch.optim.SGD and mode.optimizer_options == {"lr": DEFAULT_LR}
    refused = [
        name
        for name, given in (
            ("inner_optimizer and its settings (lr, momentum, ...)", not default),
            ("inner_batches", mode.inner_batches is not None),
            ("checkpoint", mode.checkpoint is not None),
            ("direction='forward'", mode.direction != "reverse"),
            ("compile", bool(mode.compile)),
        )
        if given
    ]
    if refused:
        raise ValueError(
            f"mode {mode.name!r} on a bilevel.FixedPoint unrolls θ ← T(θ, φ) itself, so "
            f"{', '.join(refused)} do not apply; leave them at their defaults (a step size "
            "belongs in T). Its options here: steps (and truncate), update_params, measure_memory"
        )


def _root_refusal(name: str, symmetric: bool) -> str:
    capable = [
        n
        for n in available_modes()
        if n.startswith("implicit-") and (symmetric or get_mode(n).supports_nonsymmetric)
    ]
    return (
        f"mode {name!r} unrolls an inner iteration, but bilevel.Root(F) states only the "
        "equation F(params, hparams) = 0: there is no iteration to unroll. Use an implicit "
        f"mode ({', '.join(capable)}), or state the solution as bilevel.FixedPoint(T) to "
        "unroll θ ← T(θ, φ)"
    )
