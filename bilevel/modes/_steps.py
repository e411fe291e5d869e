"""The unrolled modes' loop, shared by the three ways to differentiate it: one inner step with
its checks, cuts of θ and the optimizer state from the graph, the vector-Jacobian product to
the hparams, and the plain run (the last steps' graph kept whole, then one backward pass).

A run has two phases: ``forward(θ_0, s_0, fresh_state)`` takes the T steps and returns θ_T and
s_T, ``backward(g)`` returns dg/dφ for the outer loss g evaluated at θ_T. The plain run is
here; the checkpointed one is in ``_checkpointed.py``, forward mode in ``_forward.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._src.errors import check_finite, second_order_guard
from .._src.graph import reaches_any
from .._src.problem import BilevelProblem
from .._src.typing import Tensors
from ._backends import Stepper
from ._tied import add_start

__all__ = ["PlainRun", "cut", "floating_leaves", "graph_or_cheap_step", "inner_step", "vjp_to_phi"]

_NO_PARAMS_REACHED = (
    "inner_loss does not depend on params: the inner steps would leave them unchanged and the "
    "hypergradient would be only the direct term. If the closures call an nn.Module, pass the "
    "module itself as params (the library evaluates a module at the values it needs), not "
    "list(module.parameters()); otherwise compute inner_loss from the params it receives"
)


def cut(theta: Tensors, state: Any, stepper: Stepper) -> tuple[Tensors, Any]:
    """θ and the optimizer state cut from the graph, θ as fresh leaves that require grad."""
    return tuple(t.detach().requires_grad_() for t in theta), stepper.detach_state(state)


def floating_leaves(state: Any) -> tuple[list[Any], Any]:
    """The leaves of an optimizer state (torchopt's named tuples, higher's list of dicts) and
    its structure; the floating-point tensors among them are the state's differentiable part
    (torchopt's integer step counts are not)."""
    import torchopt

    leaves, structure = torchopt.pytree.tree_flatten(state)
    return list(leaves), structure


def is_floating(leaf: Any) -> bool:
    """Whether a state leaf is a floating-point tensor (one that can carry a derivative)."""
    return isinstance(leaf, Tensor) and leaf.is_floating_point()


def inner_step(
    problem: BilevelProblem,
    stepper: Stepper,
    theta: Tensors,
    phi: Tensors,
    state: Any,
    batch: tuple,
    step: int,
    graph: bool,
    fresh_state: bool,
) -> tuple[Tensors, Any]:
    """θ_{t+1}, s_{t+1} = Φ(θ_t, s_t, φ) on f(θ_t, φ, batch) (``graph``: keep the step
    differentiable); step 0 checks that the loss reaches θ, every step that it is finite."""
    loss = problem.inner(theta, phi, *batch)
    if step == 0 and not reaches_any(loss, theta):
        raise ValueError(_NO_PARAMS_REACHED)
    # the value only: a check deferred to the call's end must not keep the loss's graph alive
    check_finite((loss.detach(),), f"the value of inner_loss at unrolled step {step}")
    with second_order_guard("differentiating through an inner optimizer step"):
        return stepper.advance(loss, theta, state, graph, fresh_state)


def vjp_to_phi(
    outputs: Sequence[Tensor],
    cotangents: Sequence[Tensor] | None,
    phi: Tensors,
    originals: Tensors,
    others: Sequence[Tensor] = (),
    reach: list[bool] | None = None,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """vᵀ ∂outputs/∂(φ, others) for the cotangents v (None: the outputs are one scalar), with
    φ's part summed over the copies ``phi`` and any path through the user's own hparams
    tensors ``originals``: a torchopt transformation built with one of them
    (``torchopt.sgd(lr=lr_tensor)``) holds the original, not the copy, so both paths count.
    Outputs that do not require grad contribute nothing; φ's part is zeros where unreached,
    the others' part None. ``reach``: gets, per hparam, whether it was reached at all."""
    kept = [i for i, o in enumerate(outputs) if o.requires_grad]
    extra = [i for i, (t, c) in enumerate(zip(originals, phi)) if t is not c and t.requires_grad]
    if not kept:
        if reach is not None:
            reach.extend(False for _ in phi)
        return [torch.zeros_like(p) for p in phi], [None] * len(others)
    grads = torch.autograd.grad(
        [outputs[i] for i in kept],
        tuple(phi) + tuple(originals[i] for i in extra) + tuple(others),
        None if cotangents is None else [cotangents[i] for i in kept],
        allow_unused=True,
    )
    if reach is not None:  # per hparam: whether it (a copy or the user's tensor) got a gradient
        reach.extend(g is not None for g in grads[: len(phi)])
        for i, g in zip(extra, grads[len(phi) : len(phi) + len(extra)]):
            reach[len(reach) - len(phi) + i] |= g is not None
    return _summed(phi, extra, grads), list(grads[len(phi) + len(extra) :])


def _summed(phi: Tensors, extra: list[int], grads: Sequence[Tensor | None]) -> list[Tensor]:
    """φ's gradient: the copies' (zeros where unreached) plus the originals' at ``extra``."""
    total = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, phi)]
    for i, g in zip(extra, grads[len(phi) : len(phi) + len(extra)]):
        if g is not None:
            total[i] = total[i] + g
    return total


def graph_or_cheap_step(
    run: Any, theta: Tensors, phi: Tensors, state: Any, batch: tuple, step: int, graph: bool, fresh: bool
) -> tuple[Tensors, Any]:
    """One step of ``run`` (its ``problem``, ``stepper`` and ``cheap`` stepper): with its graph
    through ``stepper``, or without through ``cheap`` and then cut from the graph."""
    stepper = run.stepper if graph else run.cheap
    theta, state = inner_step(run.problem, stepper, theta, phi, state, batch, step, graph, fresh)
    return (theta, state) if graph else cut(theta, state, run.stepper)


class PlainRun:
    """The plain unroll: the steps from ``graph_from`` on keep their graph (the earlier ones
    run through ``cheap``, at detached φ, and are cut), then one backward pass from g."""

    def __init__(
        self,
        problem: BilevelProblem,
        stepper: Stepper,
        cheap: Stepper,
        phi: Tensors,
        batches: list[tuple],
        graph_from: int,
    ) -> None:
        self.problem, self.stepper, self.cheap, self.phi = problem, stepper, cheap, phi
        self.batches, self.graph_from = batches, graph_from
        self.start: Tensors = ()  # θ's leaves at the first graph step (θ_0 of a tie's chain rule)
        self.unreached: list[int] = []  # hparams the outer loss does not reach (set by backward)

    def forward(self, theta: Tensors, state: Any, fresh_state: bool) -> tuple[Tensors, Any]:
        """θ_T and s_T after the steps."""
        phi_constant = tuple(t.detach() for t in self.phi)
        for step, batch in enumerate(self.batches):
            graph = step >= self.graph_from
            if step == self.graph_from:
                theta, state = cut(theta, state, self.stepper)
                self.start = theta
            phi = self.phi if graph else phi_constant
            theta, state = graph_or_cheap_step(self, theta, phi, state, batch, step, graph, fresh_state)
            fresh_state = False
        return theta, state

    def backward(self, outer: Tensor) -> Tensors:
        """dg/dφ through the steps that kept their graph (and through θ_0 at a tie)."""
        start = self.start if self.problem.tied else ()
        reach: list[bool] = []
        grads, adjoints = vjp_to_phi((outer,), None, self.phi, self.problem.phi0, start, reach)
        # a tied hparam (MAML's initialisation) is reached through the run's start
        self.unreached = [i for i, r in enumerate(reach) if not r and i not in self.problem.tied]
        return add_start(self.problem, grads, adjoints)
