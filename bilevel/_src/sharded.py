"""Sharded params (FSDP2's ``fully_shard``): the call runs on full copies of the parameters.

A module sharded by ``fully_shard`` holds DTensor parameters, and its forward hooks gather
them into full tensors and write those into the module before every forward. Neither fits a
library that evaluates a module at tensors of its choosing: ``functional_call``'s tensors are
replaced by the hooks' (the call silently computes at the module's own values), and
second-order ``autograd.grad`` through FSDP's own gathered parameters fails after resharding
(pytorch#172543, measured on torch 2.13 with gloo). So each call gathers every sharded
parameter once (``DTensor.full_tensor()``, one all-gather each, in the module's order on every
rank), evaluates the module at full copies with its forward hooks suspended (then it is the
plain module), and differentiates the data-parallel problem as for any replicated module:
the ranks of the FSDP mesh hold different data, and ``distributed=...`` averages every
derivative over them. The user's sharded parameters are never written.

The gathers run while the call is set up, before its agreement collective: a rank that fails
to set up the call before them (a malformed argument on one rank only) would leave the
others in a gather rather than in the agreement. Setup errors are the same on every rank in
practice (the same code and structures), so this is a documented limit, not a guarded one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, cast

from torch import Tensor, nn

from .problem import BilevelProblem
from .typing import Tensors

__all__ = ["gather_sharded", "has_sharded", "sharded_modules_refusal"]


def _dtensor_type() -> type | None:
    """DTensor if its module is loaded (no DTensor can exist otherwise: importing it here
    would cost every first call half a second)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def has_sharded(tensors: Tensors) -> bool:
    """Whether any tensor is a DTensor (a sharded parameter)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def sharded_modules_refusal() -> str:
    """The error for sharded params in a call without ``distributed=...``."""
    return (
        "params hold DTensors (a module sharded by FSDP2's fully_shard): each rank holds a "
        "shard of the parameters and of the data, so only the process group's hypergradient "
        "makes sense; pass distributed=True (or the FSDP mesh's ProcessGroup)"
    )


@contextlib.contextmanager
def _hooks_suspended(modules: list[nn.Module]) -> Iterator[None]:
    """The forward (pre-)hooks of ``modules`` and their submodules removed for the block:
    FSDP's would replace the tensors the problem binds by its own gathered ones."""
    saved = []
    for module in {id(m): m for root in modules for m in root.modules()}.values():
        saved.append((module, module._forward_pre_hooks, module._forward_hooks))
        module._forward_pre_hooks = type(module._forward_pre_hooks)()
        module._forward_hooks = type(module._forward_hooks)()
    try:
        yield
    finally:
        for module, pre, post in saved:
            module._forward_pre_hooks, module._forward_hooks = pre, post


def _full(t: Tensor) -> Tensor:
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return t
    full: Tensor = cast(Any, t).full_tensor()
    return full.detach().requires_grad_(t.requires_grad)


def gather_sharded(problem: BilevelProblem, mode: Any) -> None:
    """Make ``problem`` run on full copies of its sharded params (module docstring): θ₀ as
    the gathered tensors, every closure evaluated with the forward hooks suspended. Refuses
    what would silently lose work: sharded hparams (their gradient would be a full tensor
    for a shard), a tie (MAML) and ``update_params`` (it would write into the copies)."""
    if not has_sharded(problem.theta0 + problem.phi0):
        return
    if has_sharded(problem.phi0):
        raise ValueError(
            "hparams hold DTensors (a module sharded by fully_shard): this version gathers "
            "sharded params only; keep the hyperparameters (or the auxiliary network) replicated, "
            "e.g. wrapped in DistributedDataParallel"
        )
    if problem.tied or getattr(mode, "update_params", False):
        raise ValueError(
            "a sharded (fully_shard) module runs on full copies of its parameters, so "
            "update_params=True and a tied initialisation (MAML) would write into the copies; "
            "turn update_params off, or use a replicated (DDP) module"
        )
    problem.theta0 = tuple(_full(t) for t in problem.theta0)
    modules = [slot.module for slot in problem.params_structure.modules]
    problem.context = lambda: _hooks_suspended(modules)
