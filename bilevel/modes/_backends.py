"""The unrolled modes' two backends behind one interface (a stepper): which backend runs an
optimizer, whether it differentiates a setting, and whether a loaded state fits it.

A stepper maps θ_t, s_t ↦ θ_{t+1}, s_{t+1} = Φ(θ_t, s_t, φ) for one inner step with the
optimizer state s: ``init(θ)`` gives s_0, ``advance(loss, θ, s, graph, fresh_state)`` one
step (differentiable when ``graph``), ``detach_state(s)`` cuts s from the graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor

from .._src.compat import higher_supported_optimizers
from .._src.typing import Tensors
from ._higher_backend import HigherStepper
from ._optimizer_options import BACKENDS, optimizer_class
from ._torchopt_backend import TorchoptStepper, torchopt_factories

__all__ = [
    "Stepper",
    "backend_notes",
    "check_loaded_state",
    "check_supported",
    "differentiates",
    "make_stepper",
]

Stepper = TorchoptStepper | HigherStepper


def make_stepper(
    backend: str, optimizer: Any, options: Mapping[str, Any], hyper: Mapping[str, Tensor], theta: Tensors
) -> Stepper:
    """The stepper of ``backend`` for ``optimizer`` with plain ``options`` and hyperparameter
    settings ``hyper``; configuration errors raise here."""
    if backend == "higher":
        return HigherStepper(optimizer, options, hyper, theta)
    return TorchoptStepper(optimizer, options, hyper)


def backend_notes(backend: str, optimizer: Any) -> tuple[str, ...]:
    """Warnings about a backend's numbers for this optimizer, for when the mode is built."""
    if backend == "higher" and optimizer_class(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return (
            "backend='higher' steps Adam with eps added to √v before the bias correction (as "
            "torch.optim.Adam once did), not after it as torch.optim.Adam does now: the steps "
            "differ by O(eps/√v), and a hypergradient w.r.t. eps can even change sign; use "
            "backend='torchopt' to match torch.optim.Adam",
        )
    return ()


def check_supported(optimizer: Any, backend: str) -> None:
    """Refuse, at construction, a torch optimizer class that ``backend`` has no differentiable
    version of, naming the backend that has one (or both lists when neither has)."""
    cls = optimizer_class(optimizer)
    if cls is None:
        return  # a GradientTransformation
    supported = {"torchopt": list(torchopt_factories()), "higher": list(higher_supported_optimizers())}
    if cls in supported[backend]:
        return
    other = next(b for b in BACKENDS if b != backend)
    names = {b: ", ".join(c.__name__ for c in classes) for b, classes in supported.items()}
    fix = (
        f"use backend={other!r}, which has it"
        if cls in supported[other]
        else f"neither backend has it: use one of {names['torchopt']} (torchopt) or "
        f"{names['higher']} (higher)"
    )
    raise TypeError(
        f"inner_optimizer {cls.__name__} has no differentiable version on backend={backend!r}; {fix}"
    )


def differentiates(
    backend: str, optimizer: Any, options: Mapping[str, Any], name: str, value: Tensor
) -> bool:
    """Whether ``backend`` carries gradients from the setting ``name`` to the parameters:
    two steps on ½θ² from θ = 1 with the setting as a fresh leaf, then look for a graph path."""
    setting = value.detach().clone().requires_grad_()
    theta: Tensors = (torch.ones(1, dtype=value.dtype, device=value.device, requires_grad=True),)
    try:
        stepper = make_stepper(backend, optimizer, options, {name: setting}, theta)
        state = stepper.init(theta)
        with torch.enable_grad():
            for fresh in (True, False):
                theta, state = stepper.advance(0.5 * (theta[0] ** 2).sum(), theta, state, True, fresh)
            return torch.autograd.grad(theta[0].sum(), setting, allow_unused=True)[0] is not None
    except (TypeError, ValueError, RuntimeError, KeyError):
        return False


def check_loaded_state(loaded: Any, stepper: Stepper, theta: Tensors) -> None:
    """A loaded optimizer state must have the form of this call's optimizer state (another
    optimizer, or other options such as momentum or amsgrad, differ) and tensors shaped like
    the params. higher's optimizers create their state at the first step, so there the form
    is that after one step on zero-valued copies of the params."""
    import torchopt

    fresh: Any = stepper.init(theta)
    if isinstance(stepper, HigherStepper):
        probe = tuple(torch.zeros_like(t, requires_grad=True) for t in theta)
        with torch.enable_grad():
            square = cast(Tensor, sum((t * t).sum() for t in probe))
            _, fresh = stepper.advance(square, probe, fresh, False, True)
    (leaves, form), (fresh_leaves, fresh_form) = (torchopt.pytree.tree_flatten(s) for s in (loaded, fresh))
    if form != fresh_form:
        raise ValueError(
            f"the loaded optimizer state does not fit this HyperGradient's inner optimizer: it is "
            f"{form}, but the optimizer with these options keeps {fresh_form}. Build the "
            "HyperGradient with the options the checkpoint was saved with (momentum, betas, "
            "amsgrad, ...), or start without the checkpoint"
        )
    if not all(_same_layout(a, b) for a, b in zip(leaves, fresh_leaves)):
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in theta)
        raise ValueError(
            "the loaded optimizer state holds tensors whose shapes or dtypes differ "
            f"from the params' ({shapes}); load a checkpoint saved for these params"
        )


def _same_layout(a: Any, b: Any) -> bool:
    """Whether two state leaves agree: neither a tensor, or tensors of one shape and dtype."""
    if not (isinstance(a, Tensor) or isinstance(b, Tensor)):
        return True
    return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
