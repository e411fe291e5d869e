"""Checkpointed reverse mode of the unrolled modes: dg(θ_T, φ)/dφ through the G steps that
carry the graph in memory O(G/k · P + k · graph) instead of O(G · graph).

The G graph steps are cut into segments of k steps (the first one shorter when k does not
divide G). Forward: the steps run without graph, keeping only θ, the optimizer state s (and
module buffers) at each segment's start; the last segment runs with its graph, from leaves
that require grad, so it is never recomputed. Backward: g at θ_T gives φ̄ through the last
segment and the adjoints (θ̄, s̄) at its start; then for each earlier segment, last to first,
its steps are rerun with graph from the stored start (the same batches, the optimizer's
first-update rule where the state was fresh) and one vector-Jacobian product carries (θ̄, s̄)
from its end to its start and adds the segment's part of φ̄. The sum is the plain unroll's
φ̄, the same products grouped by segment. Assumes the steps are deterministic: a step that
draws random numbers (dropout) is recomputed with other draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._src.problem import BilevelProblem
from .._src.typing import Tensors
from ._backends import Stepper
from ._steps import cut, floating_leaves, graph_or_cheap_step, inner_step, is_floating, vjp_to_phi
from ._tied import add_start

__all__ = ["CheckpointedRun", "check_checkpoint", "segment_length", "segment_starts"]


def check_checkpoint(value: Any) -> None:
    """Validate the ``checkpoint`` option: None, ``"auto"`` or a positive int."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"option checkpoint must be None, 'auto' or a positive int (steps per segment), got {value!r}"
        )
    if value <= 0:
        raise ValueError(f"option checkpoint must be a positive number of steps per segment, got {value}")


def segment_length(checkpoint: int | str | None, graph_steps: int) -> int | None:
    """Steps per segment k for G = ``graph_steps`` (None: no checkpointing). ``"auto"`` takes
    ⌈√G⌉ segments, which balances the stored states (G/k) against one segment's graph (k)."""
    if checkpoint is None:
        return None
    if checkpoint == "auto":
        return math.ceil(graph_steps / math.ceil(math.sqrt(graph_steps)))
    return min(int(checkpoint), graph_steps)


def segment_starts(graph_from: int, steps: int, k: int) -> list[int]:
    """The first step of each segment of [graph_from, steps); the remainder of the division by
    k goes first, so the last segment, never recomputed, is a full one."""
    first = graph_from + (steps - graph_from) % k
    return ([graph_from] if first > graph_from else []) + list(range(first, steps, k))


def _start_leaves(theta: Tensors, state: Any, stepper: Stepper) -> tuple[Tensors, Any, list[Tensor]]:
    """θ and s cut from the graph as leaves that require grad (θ's and s's floating tensors),
    and the state's leaves that do: the inputs of a segment's vector-Jacobian product."""
    theta, state = cut(theta, state, stepper)
    leaves, structure = floating_leaves(state)
    leaves = [t.requires_grad_() if is_floating(t) else t for t in leaves]
    return theta, structure.unflatten(leaves), [t for t in leaves if is_floating(t)]


@dataclass
class _Checkpoint:
    """A segment's start: the step, θ and s without graph, the buffers, and whether s is fresh."""

    step: int
    theta: Tensors
    state: Any
    buffers: dict[str, Tensor]
    fresh: bool

    def nbytes(self) -> int:
        leaves = [t for t in floating_leaves(self.state)[0] if isinstance(t, Tensor)]
        return sum(t.numel() * t.element_size() for t in [*self.theta, *leaves, *self.buffers.values()])


class CheckpointedRun:
    """The checkpointed unroll (see the module docstring): ``forward`` then ``backward``."""

    def __init__(
        self,
        problem: BilevelProblem,
        stepper: Stepper,
        cheap: Stepper,
        phi: Tensors,
        batches: list[tuple],
        starts: list[int],
        stepper_at: Callable[[Tensors], Stepper] | None = None,
    ) -> None:
        """``stepper_at``: the stepper with the settings evaluated at a given φ, when some
        setting is a hyperparameter: each rerun segment evaluates them anew, since the
        backward pass of a later segment frees the graph of a setting computed from φ."""
        self.problem, self.stepper, self.cheap, self.phi = problem, stepper, cheap, phi
        self.stepper_at = stepper_at
        self.batches, self.starts = batches, starts
        self.segment = len(batches) - starts[-1]  # k: the last segment is a full one
        self.saved: list[_Checkpoint] = []
        self.inputs: list[Tensor] = []  # θ and s's floating leaves at the last segment's start

    def forward(self, theta: Tensors, state: Any, fresh_state: bool) -> tuple[Tensors, Any]:
        """θ_T and s_T; segment starts before the last one are stored, the last segment keeps
        its graph."""
        last, stored = self.starts[-1], set(self.starts[:-1])
        phi_constant = tuple(t.detach() for t in self.phi)
        for step, batch in enumerate(self.batches):
            if step in stored:
                self.saved.append(self._checkpoint(step, theta, state, fresh_state))
            if step == last:
                theta, state, leaves = _start_leaves(theta, state, self.stepper)
                self.inputs = [*theta, *leaves]
            graph = step >= last
            phi = self.phi if graph else phi_constant
            theta, state = graph_or_cheap_step(self, theta, phi, state, batch, step, graph, fresh_state)
            fresh_state = False
        return theta, state

    def _checkpoint(self, step: int, theta: Tensors, state: Any, fresh: bool) -> _Checkpoint:
        theta, state = cut(theta, state, self.stepper)
        buffers = {k: v.detach().clone() for k, v in self.problem.buffers.items()}
        return _Checkpoint(step, tuple(t.detach() for t in theta), state, buffers, fresh)

    def stored_bytes(self) -> int:
        """Bytes of the stored segment starts (θ, s, buffers): the part of the memory that
        grows with G/k, outside autograd's graphs."""
        return sum(c.nbytes() for c in self.saved)

    def backward(self, outer: Tensor) -> Tensors:
        """dg/dφ: the last segment's graph, then each earlier one recomputed, last to first."""
        total, adjoints = vjp_to_phi((outer,), None, self.phi, self.problem.phi0, self.inputs)
        ends = [c.step for c in self.saved[1:]] + [self.starts[-1]]
        for checkpoint, end in zip(reversed(self.saved), reversed(ends)):
            outputs, inputs = self._recompute(checkpoint, end)
            pairs = [(o, a) for o, a in zip(outputs, adjoints) if a is not None]
            part, adjoints = vjp_to_phi(
                [o for o, _ in pairs], [a for _, a in pairs], self.phi, self.problem.phi0, inputs
            )
            total = [t + p for t, p in zip(total, part)]
        # the adjoints are now those of the first segment's start: θ_0 at a tie
        return add_start(self.problem, total, adjoints[: len(self.problem.theta0)])

    def _recompute(self, checkpoint: _Checkpoint, end: int) -> tuple[list[Tensor], list[Tensor]]:
        """The steps [checkpoint.step, end) rerun with graph: the outputs (θ and s's floating
        leaves at ``end``, aligned with the next segment's inputs) and the inputs."""
        for key, value in checkpoint.buffers.items():
            self.problem.buffers[key].copy_(value)
        stepper = self.stepper if self.stepper_at is None else self.stepper_at(self.phi)
        theta, state, leaves = _start_leaves(checkpoint.theta, checkpoint.state, stepper)
        inputs = [*theta, *leaves]
        stepper.restart()  # the first-update rule holds for this segment's first step
        fresh = checkpoint.fresh
        for step in range(checkpoint.step, end):
            theta, state = inner_step(
                self.problem, stepper, theta, self.phi, state, self.batches[step], step, True, fresh
            )
            fresh = False
        return [*theta, *(t for t in floating_leaves(state)[0] if is_floating(t))], inputs
