"""The unrolled modes' inner optimizer and its settings, independent of the backend.

An inner optimizer is a torch optimizer class, a ``functools.partial`` of one, or a torchopt
``GradientTransformation`` (an object with ``init`` and ``update``). A class's keywords are
those of the partial, overridden by the user's options. A scalar setting (``lr``,
``momentum``, ...) is a hyperparameter when it is the very tensor that is in ``hparams``
(differentiated through its copy in φ) or a callable of the hparams (evaluated at φ).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._src.problem import BilevelProblem
from .._src.typing import Tensors

__all__ = [
    "BACKENDS",
    "DEFAULT_LR",
    "check_inner_optimizer",
    "hparam_index",
    "hparams_view",
    "init_parameters",
    "is_transformation",
    "is_zero",
    "optimizer_class",
    "optimizer_kwargs",
    "optimizer_option_names",
    "signature_parameters",
    "split_mode_options",
    "split_settings",
]

BACKENDS = ("torchopt", "higher")
DEFAULT_LR = 0.1  # for the default inner optimizer, torch.optim.SGD


def is_transformation(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a torchopt ``GradientTransformation`` (duck-typed: an instance
    with ``init`` and ``update``, not a class)."""
    return hasattr(optimizer, "init") and hasattr(optimizer, "update") and not isinstance(optimizer, type)


def optimizer_class(optimizer: Any) -> type[torch.optim.Optimizer] | None:
    """The torch optimizer class behind a class or a ``functools.partial`` of one."""
    base = optimizer.func if isinstance(optimizer, functools.partial) else optimizer
    return base if isinstance(base, type) and issubclass(base, torch.optim.Optimizer) else None


@functools.lru_cache(maxsize=64)
def check_inner_optimizer(optimizer: Any) -> None:
    """Refuse a value that is neither a torch optimizer class (or a ``partial`` of one) nor a
    torchopt ``GradientTransformation``, saying what it is and what to pass instead."""
    if optimizer is None or is_transformation(optimizer) or optimizer_class(optimizer) is not None:
        return
    kind = type(optimizer)
    if isinstance(optimizer, torch.optim.Optimizer):
        public = getattr(torch.optim, kind.__name__, None) is kind
        name = f"torch.optim.{kind.__name__}" if public else kind.__name__
        what = (
            f"an optimizer instance ({name}(...)); pass the class and its options instead: "
            f"inner_optimizer={name}, lr=..."
        )
    elif isinstance(optimizer, type) and any(c.__module__.startswith("torchopt") for c in optimizer.__mro__):
        what = (
            f"{optimizer.__module__.split('.')[0]}.{optimizer.__name__}, torchopt's module-level "
            "meta-optimizer (it steps an nn.Module in place); pass inner_optimizer=torch.optim.SGD "
            "with lr=..., or a transformation such as torchopt.sgd(lr=0.1)"
        )
    else:
        shown = repr(optimizer)
        what = f"{kind.__name__} {shown[:60] + '...' if len(shown) > 60 else shown}"
    raise TypeError(
        "option inner_optimizer must be a torch optimizer class (or a functools.partial of one) "
        f"or a torchopt GradientTransformation, got {what}"
    )


@functools.lru_cache(maxsize=256)
def signature_parameters(function: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    """``inspect.signature(function).parameters``, cached (a stepper is built at every call)."""
    return inspect.signature(function).parameters


def init_parameters(cls: type[torch.optim.Optimizer]) -> Mapping[str, inspect.Parameter]:
    """The parameters of ``cls.__init__`` (``self`` and ``params`` included)."""
    return signature_parameters(cls.__init__)


def optimizer_option_names(optimizer: Any) -> list[str]:
    """Keyword arguments a torch optimizer class accepts (none for a GradientTransformation)."""
    cls = optimizer_class(optimizer)
    if cls is None:
        return []
    return [n for n in init_parameters(cls) if n not in ("self", "params")]


def optimizer_kwargs(optimizer: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The class's keywords: those of a ``partial`` overridden by the user's options."""
    kwargs = dict(optimizer.keywords) if isinstance(optimizer, functools.partial) else {}
    kwargs.update(options)
    return kwargs


def split_mode_options(
    name: str, own_names: list[str], options: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A mode's own options and its inner optimizer's keywords (``lr``, ``momentum``, ...), from
    the keywords given to ``HyperGradient``; one that neither knows raises ``TypeError`` listing
    both."""
    own = {k: v for k, v in options.items() if k in own_names}
    check_inner_optimizer(own.get("inner_optimizer"))  # before its keywords are judged by it
    rest = {k: v for k, v in options.items() if k not in own}
    valid = optimizer_option_names(own.get("inner_optimizer") or torch.optim.SGD)
    unknown = sorted(set(rest) - set(valid))
    if unknown:
        raise TypeError(
            f"mode {name!r} got unknown option(s) {', '.join(unknown)}; its options are: "
            f"{', '.join(own_names)}" + (f"; the inner optimizer's are: {', '.join(valid)}" if valid else "")
        )
    return own, rest


def is_zero(value: Any) -> bool:
    """Whether ``value`` is the number 0 (a tensor or a callable is never taken for zero)."""
    return isinstance(value, (int, float)) and value == 0


def hparam_index(problem: BilevelProblem, value: Tensor) -> int | None:
    """The position of the very tensor ``value`` among the user's hparams (None if absent)."""
    return next((i for i, t in enumerate(problem.phi0) if t is value), None)


def hparams_view(problem: BilevelProblem, phi: Tensors) -> Any:
    """φ in the structure of the user's ``hparams``, as a callable setting receives it (the
    package's one place that builds it for the unrolled modes)."""
    return problem.hparams_structure.unflatten(phi)


def split_settings(
    problem: BilevelProblem, phi: Tensors, settings: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The optimizer's settings at φ, split into plain values and hyperparameters: a tensor of
    ``hparams`` (mapped to its differentiable copy in ``phi``) or a callable of the hparams
    (evaluated at ``phi``) that returns a scalar tensor requiring grad. A 1-element tensor
    that does not require grad becomes a number."""
    options: dict[str, Any] = {}
    hyper: dict[str, Tensor] = {}
    view = functools.cache(functools.partial(hparams_view, problem, phi))  # built once, if needed
    for name, given in settings.items():
        value = _resolve(name, given, problem, phi, view)
        if isinstance(value, Tensor) and value.requires_grad:
            if value.numel() != 1:
                raise ValueError(
                    f"option {name} must be a scalar tensor to be a hyperparameter, "
                    f"got shape {tuple(value.shape)}"
                )
            hyper[name] = value.reshape(())
        else:
            options[name] = value.item() if isinstance(value, Tensor) and value.numel() == 1 else value
    return options, hyper


def _resolve(name: str, value: Any, problem: BilevelProblem, phi: Tensors, view: Callable[[], Any]) -> Any:
    """The setting ``name`` at this call: a callable of the hparams evaluated on ``view()``, a
    tensor of the hparams replaced by its copy in ``phi``; a tensor that requires grad but is
    neither (its gradient would be lost) is refused."""
    if callable(value) and not isinstance(value, (Tensor, type)):
        return value(view())
    if isinstance(value, Tensor):
        index = hparam_index(problem, value)
        if index is not None:
            return phi[index]
        if value.requires_grad:
            raise ValueError(
                f"option {name} is a tensor that requires grad but is not one of the hparams "
                f"tensors; pass that very tensor (in hparams), a callable of the hparams such "
                f"as {name}=lambda h: h['log_{name}'].exp(), or a float"
            )
        return value
    if isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) and v.requires_grad for v in value):
        raise ValueError(
            f"option {name} holds a tensor that requires grad; only scalar "
            "settings (lr, momentum, ...) can be hyperparameters: pass numbers"
        )
    return value
