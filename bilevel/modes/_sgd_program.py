"""The unrolled modes' compiled path: T steps of ``torch.optim.SGD`` and the hypergradient
through them as one pure function (``torch.func``), which ``compile=True`` hands to
:func:`bilevel._src.compiled.compiled_path`.

It implements SGD's math only (``lr``, ``momentum``, ``dampening``, ``weight_decay``,
``nesterov``, ``maximize``, each a number or a hyperparameter), on either backend, since both
agree with torch on SGD. :func:`not_compilable` names what else keeps a call eager.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._src.problem import BilevelProblem
from .._src.typing import Tensors
from ._optimizer_options import hparam_index, hparams_view, is_zero, optimizer_class, optimizer_kwargs
from ._tied import tied_start

__all__ = ["ProgramSettings", "not_compilable", "program_settings", "sgd_unroll_program"]

#: SGD option -> ("value", number), ("hparam", index into φ) or ("callable", fn of the hparams)
ProgramSettings = dict[str, tuple[str, Any]]

#: torch.optim.SGD's settings that the compiled program implements, with torch's defaults
_SGD_SETTINGS = {
    "lr": 1e-3,
    "momentum": 0.0,
    "dampening": 0.0,
    "weight_decay": 0.0,
    "nesterov": False,
    "maximize": False,
}
_SGD_SWITCHES = ("foreach", "fused", "differentiable")  # implementation switches, no math


def sgd_unroll_program(
    problem: BilevelProblem,
    theta: Tensors,
    phi: Tensors,
    buffers: dict[str, Tensor],
    steps: int,
    graph_from: int,
    settings: ProgramSettings,
    batches: tuple | None,
) -> tuple[Tensors, Tensors]:
    """``(dg(θ_T, φ)/dφ, θ_T)`` through ``steps`` steps of ``torch.optim.SGD``, as one pure
    function (``torch.func``) for the compiled path; steps before ``graph_from`` carry no
    graph (truncation). ``settings`` maps an SGD option to ``("value", number)``,
    ``("hparam", index into φ)`` or ``("callable", fn of the hparams)``. Torch's rule:
    g ← ∇f + wd·θ; b ← g at the first step, else μ·b + (1 − dampening)·g; g ← g + μ·b
    (Nesterov) or b; θ ← θ − lr·g (+ with ``maximize``).
    """

    def setting(name: str, ph: Tensors) -> Any:
        kind, value = settings.get(name, ("value", _SGD_SETTINGS[name]))
        if kind == "hparam":
            return ph[value].reshape(())
        if kind == "callable":
            return value(hparams_view(problem, ph)).reshape(())
        return value

    def unrolled_outer(ph: Tensors) -> tuple[Tensor, Tensors]:
        th, buf = tied_start(problem, theta, ph), None  # a tie starts at φ itself
        for step in range(steps):
            if step == graph_from and step > 0:  # θ_0 is already cut, or starts at φ (a tie)
                th = tuple(t.detach() for t in th)
                buf = None if buf is None else tuple(b.detach() for b in buf)
            at = ph if step >= graph_from else tuple(t.detach() for t in ph)
            extra = batches[step] if batches is not None else ()
            grads = torch.func.grad(functools.partial(_inner, problem, at=at, extra=extra, buffers=buffers))(
                th
            )
            lr, momentum = setting("lr", at), setting("momentum", at)
            decay, dampening = setting("weight_decay", at), setting("dampening", at)
            if not is_zero(decay):
                grads = tuple(g + decay * t for g, t in zip(grads, th))
            if not is_zero(momentum):
                buf = (
                    grads
                    if buf is None
                    else tuple(momentum * b + (1 - dampening) * g for b, g in zip(buf, grads))
                )
                nesterov = setting("nesterov", at)
                grads = tuple(g + momentum * b for g, b in zip(grads, buf)) if nesterov else buf
            sign = 1.0 if setting("maximize", at) else -1.0
            th = tuple(t + sign * lr * g for t, g in zip(th, grads))
        return problem.call("outer_loss", th, ph, (), buffers).reshape(()), th

    hypergradient, theta_final = torch.func.grad(unrolled_outer, has_aux=True)(phi)
    return hypergradient, tuple(t.detach() for t in theta_final)


def not_compilable(
    optimizer: Any, options: Mapping[str, Any], measure_memory: bool, update_params: bool
) -> str | None:
    """Why :func:`sgd_unroll_program` cannot run this configuration (None if it can)."""
    if optimizer_class(optimizer) is not torch.optim.SGD:
        return "the compiled program implements torch.optim.SGD only"
    kwargs = optimizer_kwargs(optimizer, options)
    unknown = sorted(set(kwargs) - set(_SGD_SETTINGS) - set(_SGD_SWITCHES))
    if unknown:
        return f"it does not implement SGD's {', '.join(unknown)}"
    if measure_memory:
        return "measure_memory=True needs the eager graph"
    if update_params and not is_zero(kwargs.get("momentum", 0.0)):
        return "update_params=True with momentum carries a backend's optimizer state"
    return None


def program_settings(
    problem: BilevelProblem, optimizer: Any, options: Mapping[str, Any]
) -> ProgramSettings | None:
    """The SGD options as :func:`sgd_unroll_program` takes them; None (run eagerly, which
    explains the error) for a tensor that requires grad but is not in the hparams."""
    spec: ProgramSettings = {}
    for name, value in optimizer_kwargs(optimizer, options).items():
        if name in _SGD_SWITCHES:
            continue
        if callable(value) and not isinstance(value, (Tensor, type)):
            spec[name] = ("callable", value)
        elif isinstance(value, Tensor):
            index = hparam_index(problem, value)
            if index is None and value.requires_grad:
                return None
            spec[name] = ("value", value.item()) if index is None else ("hparam", index)
        else:
            spec[name] = ("value", value)
    return spec


def _inner(
    problem: BilevelProblem, theta: Tensors, *, at: Tensors, extra: tuple, buffers: dict[str, Tensor]
) -> Tensor:
    """f(θ, φ) on a mini-batch, as the program differentiates it (a function of θ alone)."""
    return problem.call("inner_loss", theta, at, extra, buffers).reshape(())
