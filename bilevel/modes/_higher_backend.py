"""The higher backend of the unrolled modes: θ, state ↦ θ', state' with higher's
differentiable version of a torch optimizer class.

The torch optimizer is built once on zero-valued placeholders of the params; higher copies
its settings (hyperparameter settings come in through ``override``, so they stay
differentiable) and the unrolled loop carries the per-parameter state between steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._src.compat import HigherState, higher_initial_state, higher_step, higher_supported_optimizers
from .._src.typing import Tensors
from ._optimizer_options import init_parameters, is_transformation, optimizer_class, optimizer_kwargs

__all__ = ["HIGHER_IGNORES", "HigherStepper"]

#: torch optimizer options that higher's differentiable optimizers do not implement
HIGHER_IGNORES = ("maximize", "decoupled_weight_decay")


def _check_not_ignored(cls: type[torch.optim.Optimizer], kwargs: Mapping[str, Any]) -> None:
    """Refuse an option that higher would silently ignore, unless it is at torch's default."""
    signature = init_parameters(cls)
    for name in HIGHER_IGNORES:
        if name in kwargs and name in signature and kwargs[name] != signature[name].default:
            raise TypeError(
                f"higher's differentiable {cls.__name__} ignores {name}={kwargs[name]!r}; "
                "use backend='torchopt' or leave it at its default"
            )


class HigherStepper:
    """θ, state ↦ θ', state' with higher's differentiable version of a torch optimizer."""

    #: whether a step without graph (``graph=False``) cuts θ' from θ, which would drop the
    #: tangents of forward-mode AD: higher detaches the new params when it keeps no graph
    cuts_without_graph = True

    def __init__(
        self, optimizer: Any, options: Mapping[str, Any], hyper: Mapping[str, Tensor], theta: Tensors
    ) -> None:
        if is_transformation(optimizer):
            raise TypeError(
                "a torchopt GradientTransformation cannot run on backend='higher'; use "
                "backend='torchopt', or pass a torch optimizer class such as torch.optim.SGD"
            )
        cls = optimizer_class(optimizer)
        supported = higher_supported_optimizers()
        if cls is None or cls not in supported:
            names = ", ".join(c.__name__ for c in supported)
            raise TypeError(f"higher has no differentiable version of {optimizer!r}; supported: {names}")
        kwargs = optimizer_kwargs(optimizer, options)
        _check_not_ignored(cls, kwargs)
        kwargs.update({k: float(v.detach()) for k, v in hyper.items()})  # real values come via override
        self.placeholders = [torch.zeros_like(t) for t in theta]
        self.optimizer = cls(self.placeholders, **kwargs)
        self.override = {k: [v] for k, v in hyper.items()}
        self._diffopts: dict[bool, Any] = {}

    def diffopt(self, graph: bool) -> Any:
        """higher's differentiable optimizer, with (``graph``) or without a graph of its steps."""
        import higher.optim

        if graph not in self._diffopts:
            self._diffopts[graph] = higher.optim.get_diff_optim(
                self.optimizer, self.placeholders, override=self.override or None, track_higher_grads=graph
            )
        return self._diffopts[graph]

    def init(self, theta: Tensors) -> HigherState:
        """The state torch's constructor sets up (Adagrad's sums; empty for most optimizers),
        with a tensor step count as a number: higher increments it in place."""
        return higher_initial_state(self.optimizer, self.placeholders)

    def advance(
        self, loss: Tensor, theta: Tensors, state: HigherState, graph: bool, fresh_state: bool
    ) -> tuple[Tensors, HigherState]:
        """One step on ``loss``; ``graph``: keep the step differentiable (``fresh_state``
        does not matter here: higher's optimizers keep everything in their state)."""
        return higher_step(self.diffopt(graph), loss, theta, state)

    def restart(self) -> None:
        """Steps rerun from a stored state: nothing to reset (higher keeps no flag outside
        the state)."""

    @staticmethod
    def detach_state(state: HigherState) -> HigherState:
        """``state`` with every tensor detached (a truncation point, or a state to keep)."""
        return [{k: v.detach() if isinstance(v, Tensor) else v for k, v in entry.items()} for entry in state]
