"""Every workaround that relies on torchopt's or higher's internals, in one place.

Each function's docstring names the internal it relies on and why the package needs it;
``tests/test_compat.py`` checks each internal against the installed versions, so a release
that changes one fails there by name instead of silently changing hypergradients. The
unrolled modes' steppers (``bilevel/modes/_torchopt_backend.py``, ``_higher_backend.py``)
call these functions; nothing else in the package touches those internals. torchopt and
higher are imported when a function runs, as everywhere in the package: importing
``bilevel`` does not load them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .typing import Tensors

__all__ = [
    "HigherState",
    "higher_initial_state",
    "higher_step",
    "higher_supported_optimizers",
    "set_first_call",
    "torchopt_counts_as_float64",
]

#: per-parameter optimizer state, aligned with the params: a dict of tensors and numbers each
HigherState = list[dict[str, Any]]


# ---------------------------------------------------------------------------------- torchopt
def set_first_call(function: Any, value: bool, seen: set[int] | None = None) -> None:
    """Set every ``first_call`` flag in the closures of a torchopt update function to ``value``.

    Relies on: ``torchopt.transform.trace`` (behind ``torchopt.sgd(momentum=...)``) keeping
    "this is the first update" as a ``nonlocal first_call`` bool of ``update_fn``, not in the
    optimizer state; the flag sits in a closure cell of the update function or of a function
    (or tuple/list of functions) it closes over (``chain`` nests them).

    Why: at the first update torchopt sets the momentum buffer b ← g (torch's rule, no
    dampening), later b ← μ·b + (1 − dampening)·g. A run from a fresh state needs the flag
    True and a run that continues from an advanced state (``update_params``) False, whatever
    earlier calls did with the same transformation (the user's, reused across calls).
    """
    seen = set() if seen is None else seen
    if id(function) in seen:
        return
    seen.add(id(function))
    if isinstance(function, (tuple, list)):
        for item in function:
            set_first_call(item, value, seen)
        return
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None)
    if code is not None and cells:
        _set_in_cells(code.co_freevars, cells, value, seen)


def _set_in_cells(names: Sequence[str], cells: Sequence[Any], value: bool, seen: set[int]) -> None:
    """:func:`set_first_call` on a function's closure cells (``names``: its free variables)."""
    for name, cell in zip(names, cells):
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if name == "first_call" and isinstance(content, bool):
            cell.cell_contents = value
        elif callable(content) or isinstance(content, (tuple, list)):
            set_first_call(content, value, seen)


def torchopt_counts_as_float64(state: Any) -> Any:
    """``state`` with its int64 tensors (torchopt's step counts) cast to float64.

    Relies on: torchopt's transformations with a step count (``scale_by_adam``,
    ``scale_by_schedule``, ...) keeping it as a 0-dim int64 tensor in the state, incremented
    by ``inc_count``, and on nothing else in a state being int64.

    Why: ``decay ** count`` with an int64 ``count`` comes out in the default dtype
    (float32), so Adam's bias correction would cap float64 runs at float32 accuracy.
    Counts held in float64 are exact below 2**53 and keep the arithmetic in float64.
    """
    import torchopt

    return torchopt.pytree.tree_map(
        lambda t: t.to(torch.float64) if isinstance(t, Tensor) and t.dtype == torch.int64 else t, state
    )


# ------------------------------------------------------------------------------------ higher
def higher_supported_optimizers() -> dict[type, type]:
    """torch optimizer class -> higher's differentiable version of it (a copy).

    Relies on: ``higher.optim._opt_mapping``, the private registry behind
    ``higher.optim.get_diff_optim`` (``higher.register_optim`` adds to it); higher has no
    public way to ask which optimizers it supports.

    Why: an unsupported class is refused when the mode is built, with the list of the
    supported ones, instead of failing at the first call inside higher.
    """
    import higher.optim

    return dict(higher.optim._opt_mapping)


def higher_initial_state(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> HigherState:
    """The state torch's constructor sets up for ``params`` (Adagrad's sums; empty for most
    optimizers), tensors cloned, with a tensor ``step`` count as a Python float.

    Relies on: higher's differentiable optimizers incrementing ``state['step'] += 1`` on the
    dict they are given. Torch keeps ``step`` as a tensor, so the increment would run in place
    on a tensor shared with a state saved earlier (a checkpoint, the previous call's state);
    a number is rebound instead.
    """
    return [
        {
            k: (float(v) if k == "step" else v.clone()) if isinstance(v, Tensor) else v
            for k, v in optimizer.state[p].items()
        }
        for p in params
    ]


def higher_step(
    diffopt: Any, loss: Tensor, theta: Tensors, state: HigherState
) -> tuple[Tensors, HigherState]:
    """One step of a higher ``DifferentiableOptimizer`` on ``loss`` from ``theta`` and the
    per-parameter ``state``; returns the new params and the new state (out of place).

    Relies on: ``DifferentiableOptimizer.state`` being a list over param groups of mappings
    from a parameter's position in its group to its state dict, read and written by ``step``;
    the optimizer was built with one group holding the params in order.

    Why: higher keeps the state inside the optimizer object, but the unrolled modes carry it
    between steps and calls (truncation detaches it, ``update_params`` keeps it), so it is
    loaded before each step and read back after.
    """
    for i, entry in enumerate(state):
        diffopt.state[0][i] = dict(entry)
    new = diffopt.step(loss, params=list(theta))
    return tuple(new), [dict(diffopt.state[0][i]) for i in range(len(theta))]
