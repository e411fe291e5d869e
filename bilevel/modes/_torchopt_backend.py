"""The torchopt backend of the unrolled modes: θ, state ↦ θ', state' with a torchopt
``GradientTransformation``, out of place, so every step stays differentiable.

A torch optimizer class maps to torchopt's functional version of it, with the class's own
defaults where torchopt has none or another. Plain SGD (no momentum, weight decay or
``maximize``; ``lr`` a number) is stepped directly as θ − lr·g, which is torchopt's update.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._src.compat import set_first_call, torchopt_counts_as_float64
from .._src.tree_math import axpy
from .._src.typing import Tensors
from ._optimizer_options import (
    init_parameters,
    is_transformation,
    is_zero,
    optimizer_class,
    optimizer_kwargs,
    signature_parameters,
)

__all__ = ["TorchoptStepper", "is_plain_sgd", "torchopt_factories"]

# implementation switches of torch.optim, meaningless for a functional optimizer
_SWITCHES = ("foreach", "fused", "differentiable", "capturable")


def torchopt_factories() -> dict[type[torch.optim.Optimizer], Callable[..., Any]]:
    """torch optimizer class -> the torchopt function that builds its transformation."""
    import torchopt

    return {
        torch.optim.SGD: torchopt.sgd,
        torch.optim.Adam: torchopt.adam,
        torch.optim.AdamW: torchopt.adamw,
        torch.optim.RMSprop: torchopt.rmsprop,
        torch.optim.Adagrad: torchopt.adagrad,
    }


def is_plain_sgd(settings: Mapping[str, Any]) -> bool:
    """Whether torchopt.sgd with these settings (numbers) is θ ← θ − lr·g with an empty state."""
    lr = settings.get("lr")
    return (
        isinstance(lr, (int, float))
        and not isinstance(lr, bool)
        and all(is_zero(settings.get(name, 0.0)) for name in ("momentum", "weight_decay"))
        and not settings.get("maximize", False)
        and not settings.get("nesterov", False)
    )


def _factory(optimizer: Any) -> tuple[type[torch.optim.Optimizer], Callable[..., Any]]:
    """The torch class behind ``optimizer`` and torchopt's factory for it."""
    cls = optimizer_class(optimizer)
    factories = torchopt_factories()
    if cls is None or cls not in factories:
        raise TypeError(
            f"inner_optimizer {cls.__name__ if cls else repr(optimizer)} has no torchopt "
            f"equivalent; use one of {', '.join(c.__name__ for c in factories)}, a "
            "torchopt GradientTransformation, or backend='higher'"
        )
    return cls, factories[cls]


def _factory_kwargs(
    cls: type[torch.optim.Optimizer], factory: Callable[..., Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The keywords for ``factory``: the torch class's defaults where torchopt has none or
    another (torchopt.sgd needs ``lr``), then the user's; an option torchopt lacks is refused
    unless it is at the class's default."""
    accepted = signature_parameters(factory)
    defaults = {n: p.default for n, p in init_parameters(cls).items()}
    passed = {n: d for n, d in defaults.items() if n in accepted and d is not inspect.Parameter.empty}
    for name, value in kwargs.items():
        if name in accepted:
            passed[name] = value
        elif name in _SWITCHES:
            continue
        elif value != defaults.get(name, inspect.Parameter.empty):
            raise TypeError(
                f"torchopt's {factory.__name__} has no option {name}={value!r}; "
                "use backend='higher' or leave it at its default"
            )
    return passed


class TorchoptStepper:
    """θ, state ↦ θ', state' with a torchopt GradientTransformation (out of place)."""

    #: whether a step without graph (``graph=False``) cuts θ' from θ, which would drop the
    #: tangents of forward-mode AD: not here (torchopt's update is out of place either way)
    cuts_without_graph = False

    def __init__(self, optimizer: Any, options: Mapping[str, Any], hyper: Mapping[str, Tensor]) -> None:
        self.unused = True  # no update has run through this stepper yet
        self.plain_lr: float | None = None  # set for plain SGD: θ − lr·g, computed directly
        if is_transformation(optimizer):
            self.transform = optimizer
            return
        cls, factory = _factory(optimizer)
        passed = _factory_kwargs(cls, factory, {**optimizer_kwargs(optimizer, options), **hyper})
        self.transform = factory(**passed)
        if cls is torch.optim.SGD and not hyper and is_plain_sgd(passed):
            self.plain_lr = float(passed["lr"])

    def init(self, theta: Tensors) -> Any:
        """The transformation's fresh state for ``theta`` (step counts in float64 for float64
        params, so that bias corrections keep float64 accuracy)."""
        state = self.transform.init(theta)
        return torchopt_counts_as_float64(state) if theta[0].dtype == torch.float64 else state

    def advance(
        self, loss: Tensor, theta: Tensors, state: Any, graph: bool, fresh_state: bool
    ) -> tuple[Tensors, Any]:
        """One step on ``loss``; ``graph``: keep the step differentiable; ``fresh_state``:
        ``state`` is the transformation's initial one (torchopt's first-update rule applies)."""
        import torchopt

        grads = torch.autograd.grad(loss, theta, create_graph=graph, allow_unused=True)
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, theta))
        if self.plain_lr is not None:
            # torchopt.sgd's update without momentum, weight decay or maximize is −lr·g and its
            # state is empty: one fused launch on CUDA instead of a multiply and an add per tensor
            return axpy(-self.plain_lr, grads, theta), state
        if self.unused:  # the transformation may be new, or the user's, used by earlier calls
            set_first_call(self.transform.update, fresh_state)
            self.unused = False
        updates, state = self.transform.update(grads, state, params=theta, inplace=False)
        return tuple(torchopt.apply_updates(theta, updates, inplace=False)), state

    def restart(self) -> None:
        """Steps rerun from a stored state (a checkpointed segment): the next ``advance``
        sets the transformation's first-update flag from its ``fresh_state`` again."""
        self.unused = True

    @staticmethod
    def detach_state(state: Any) -> Any:
        """``state`` with every tensor detached (a truncation point, or a state to keep)."""
        import torchopt

        return torchopt.pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)
