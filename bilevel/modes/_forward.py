"""Forward mode of the unrolled modes (Franceschi et al., ICML 2017): the tangents
θ̇ = dθ_t/dφ_i carried forward through the steps, one per hyperparameter entry i, then
dg/dφ_i = ∂g/∂φ_i + ⟨∂g/∂θ_T, θ̇_T⟩.

From θ̇ = ṡ = 0 at the first graph step, each step is a Jacobian-vector product of the step
map, (θ̇, ṡ) ← ∂Φ/∂(θ, s)·(θ̇, ṡ) + ∂Φ/∂φ·e_i, taken by ``torch.autograd.forward_ad``
through the inner gradient too (forward-over-reverse: the backward pass that computes ∇θ f
runs on dual tensors), so either backend's step carries it. Every (step, entry) pair opens a
dual level of its own: a level held across the steps would keep every step's tangent
computations alive. Memory: θ, s and n tangents of them, plus one step's graph, whatever T;
time: about n forward-over-reverse steps per step, so this suits few entries (learning
rates, momenta, a handful of decays).

The φ copies are dual tensors that also require grad: a setting is taken for a
hyperparameter only when it requires grad (``split_settings``), which ``torch.func.jvp``'s
inputs would not. A torchopt transformation built with a hparams tensor holds the user's
tensor, which carries no tangent: refused. Each tangent is cast to its primal's dtype (in
float32 a Python float times a 0-dim tensor can give a float64 tangent).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

from .._src.errors import HypergradientWarning, user_stacklevel
from .._src.graph import reached
from .._src.problem import BilevelProblem
from .._src.typing import Tensors
from ._backends import Stepper
from ._optimizer_options import is_transformation
from ._steps import cut, floating_leaves, inner_step, is_floating, vjp_to_phi
from ._tied import start_tangent

__all__ = ["DIRECTIONS", "ForwardRun", "check_direction", "check_tangents"]

DIRECTIONS = ("reverse", "forward")

_TRANSFORMATION_WITH_HPARAM = (
    "direction='forward' cannot carry tangents through a torchopt GradientTransformation built "
    "with a hparams tensor (torchopt.sgd(lr=lr_tensor) holds your tensor, not one this call can "
    "make dual); pass the optimizer class instead (inner_optimizer=torch.optim.SGD, "
    "lr=lr_tensor), or use direction='reverse'"
)


def check_direction(direction: Any, checkpoint: Any) -> None:
    """Validate the ``direction`` option, and refuse ``checkpoint`` with forward mode."""
    if direction not in DIRECTIONS:
        raise ValueError(f"option direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if direction == "forward" and checkpoint is not None:
        raise ValueError(
            "option checkpoint applies to direction='reverse' only: forward mode keeps no "
            "graph across steps; drop checkpoint, or use direction='reverse'"
        )


def check_tangents(entries: int, graph_steps: int, limit: int) -> None:
    """Refuse more hparams entries than ``limit`` (forward mode's time grows with them), and
    warn when there are at least as many as graph steps: then the n tangents (n·P floats)
    hold at least what the reverse unroll's T step graphs must (each keeps θ-sized tensors),
    at about n times its time."""
    if entries > limit:
        raise ValueError(
            f"direction='forward' carries one tangent per hyperparameter entry, so its time and "
            f"memory grow with their number: hparams has {entries} entries, above "
            f"max_tangents={limit}. The reverse unroll costs one backward pass whatever their "
            "number: use direction='reverse' (with checkpoint='auto' for memory that grows with "
            f"√steps), or raise max_tangents"
        )
    if entries >= graph_steps:
        warnings.warn(
            f"direction='forward' with {entries} hyperparameter entries over {graph_steps} "
            f"graph steps costs about {entries} times the reverse unroll's time, and its "
            "tangents hold at least what the reverse unroll's graphs must: direction='reverse' "
            "(checkpoint='auto' for bounded memory) is likely cheaper",
            HypergradientWarning,
            stacklevel=user_stacklevel(),
        )


def _one_hot(p: Tensor, j: int) -> Tensor:
    """The tangent e_j of an entry of ``p`` (flat position ``j``)."""
    unit = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
    unit[j] = 1.0
    return unit.reshape(p.shape)


def _dual(tensor: Any, tangent: Tensor | None) -> Any:
    return fwad.make_dual(tensor, tangent) if tangent is not None and is_floating(tensor) else tensor


def _primal(value: Any) -> Any:
    return fwad.unpack_dual(value).primal.detach() if isinstance(value, Tensor) else value


def _tangent(value: Any) -> Tensor | None:
    if not is_floating(value):
        return None
    primal, tangent = fwad.unpack_dual(value)
    return None if tangent is None else tangent.detach().to(primal.dtype)


class ForwardRun:
    """Forward mode (see the module docstring): ``forward`` carries the tangents, ``backward``
    contracts them with ∂g/∂θ_T."""

    def __init__(
        self,
        problem: BilevelProblem,
        steppers: tuple[Stepper, Stepper],
        stepper_at: Callable[[Tensors], Stepper] | None,
        phi: Tensors,
        batches: list[tuple],
        graph_from: int,
    ) -> None:
        """``steppers``: the graph one and the one at detached φ (for steps before
        ``graph_from``); ``stepper_at``: the stepper with the settings evaluated at a given
        φ, when some setting is a hyperparameter (each dual level then builds its own)."""
        self.problem, (self.stepper, self.cheap), self.phi = problem, steppers, phi
        self.stepper_at, self.batches, self.graph_from = stepper_at, batches, graph_from
        self.transformation = is_transformation(getattr(self.stepper, "transform", None))
        self.entries = [(a, j) for a, p in enumerate(phi) for j in range(p.numel())]
        # θ̇_0 = 0, or e_k at θ_i when φ_a is tied to θ_i (the run starts at φ_a)
        self.dtheta: list[list[Tensor | None]] = [start_tangent(problem, e) for e in self.entries]
        self.dstate: list[list[Tensor | None]] = [[] for _ in self.entries]
        self.theta: Tensors = ()

    def forward(self, theta: Tensors, state: Any, fresh_state: bool) -> tuple[Tensors, Any]:
        """θ_T and s_T (as values; θ_T as leaves for ``backward``), the tangents alongside."""
        phi_constant = tuple(t.detach() for t in self.phi)
        for step, batch in enumerate(self.batches):
            if step >= self.graph_from:
                theta, state = self._advance(theta, state, batch, step, fresh_state)
            else:
                theta, state = inner_step(
                    self.problem, self.cheap, theta, phi_constant, state, batch, step, False, fresh_state
                )
                theta, state = cut(theta, state, self.stepper)
            fresh_state = False
        self.theta = tuple(t.detach().requires_grad_() for t in theta)
        return self.theta, state

    def tangent_bytes(self) -> int:
        """Bytes of the tangents held between steps (n copies of θ and s)."""
        held = [t for row in self.dtheta + self.dstate for t in row if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def _advance(
        self, theta: Tensors, state: Any, batch: tuple, step: int, fresh: bool
    ) -> tuple[Tensors, Any]:
        """One step, taken once per entry in a dual level of its own: θ_{t+1} and s_{t+1} (the
        same in every level; the first level's) and each entry's tangents."""
        theta = tuple(t.detach().requires_grad_() for t in theta)
        buffers = {k: v.clone() for k, v in self.problem.buffers.items()}  # each level steps once
        results = []
        for i in range(len(self.entries)):
            for key, value in buffers.items():
                self.problem.buffers[key].copy_(value)
            with fwad.dual_level():
                out_theta, out_state = self._dual_step(i, theta, state, batch, step, fresh)
                if i == 0 and step == self.graph_from:
                    self._check_originals(out_theta)
                out_leaves, out_structure = floating_leaves(out_state)
                self.dtheta[i] = [_tangent(t) for t in out_theta]
                self.dstate[i] = [_tangent(t) for t in out_leaves]
                if i == 0:
                    primal_state = out_structure.unflatten([_primal(t) for t in out_leaves])
                    results.append((tuple(_primal(t) for t in out_theta), primal_state))
        return results[0]

    def _dual_step(
        self, i: int, theta: Tensors, state: Any, batch: tuple, step: int, fresh: bool
    ) -> tuple[Tensors, Any]:
        """The step on dual tensors, entry ``i``'s tangents attached (inside a dual level)."""
        a, j = self.entries[i]
        phi = tuple(_dual(p, _one_hot(p, j)) if k == a else p for k, p in enumerate(self.phi))
        stepper = self.stepper if self.stepper_at is None else self.stepper_at(phi)
        stepper.restart()  # the first-update rule from ``fresh``, whichever level runs
        leaves, structure = floating_leaves(state)
        tangents = self.dstate[i] or [None] * len(leaves)
        dual_state = structure.unflatten([_dual(t, d) for t, d in zip(leaves, tangents)])
        dual_theta = tuple(_dual(t, d) for t, d in zip(theta, self.dtheta[i]))
        # higher cuts the new params from the graph when it keeps none, with their tangents
        graph = stepper.cuts_without_graph
        return inner_step(self.problem, stepper, dual_theta, phi, dual_state, batch, step, graph, fresh)

    def _check_originals(self, theta: Tensors) -> None:
        """Refuse a transformation that holds one of the user's hparams tensors."""
        if not self.transformation:
            return
        originals = tuple(t for t, c in zip(self.problem.phi0, self.phi) if t is not c)
        if any(t.grad_fn is not None and any(reached(t, originals)) for t in theta):
            raise ValueError(_TRANSFORMATION_WITH_HPARAM)

    def backward(self, outer: Tensor) -> Tensors:
        """∂g/∂φ + ⟨∂g/∂θ_T, θ̇_T⟩ per entry."""
        direct, grads = vjp_to_phi((outer,), None, self.phi, self.problem.phi0, self.theta)
        dots: list[list[Tensor]] = [[] for _ in self.phi]
        zero = torch.zeros((), dtype=self.phi[0].dtype, device=self.phi[0].device)
        for (a, _), tangents in zip(self.entries, self.dtheta):
            terms = [(g * d).sum() for g, d in zip(grads, tangents) if g is not None and d is not None]
            dots[a].append(torch.stack(terms).sum() if terms else zero)
        return tuple(d + torch.stack(row).reshape(d.shape) if row else d for d, row in zip(direct, dots))
