"""What a ``HyperGradient`` checkpoint holds besides the mode's state, and how old ones load.

A checkpoint is the dict of :meth:`HyperGradient.state_dict`::

    {"format": 2, "mode": name, "signature": {option: str} | None,
     "layout": layout | None, "state": the mode's state}

The layout of a problem is plain data derived from the pytree specs of params and hparams,
their shapes and dtype (see :func:`layout_of`): comparable across processes, and readable by
``torch.load(weights_only=True)``. Earlier forms, which :func:`upgrade` reads:

* format 1 (bilevel 0.1.0): the same keys without ``"format"``; its layouts already have the
  form of :func:`layout_of` (its structures were flattened into the same plain tuples);
* before 0.1.0 recorded configurations and layouts: ``{"mode", "state"}`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .pytree import describe, plain

if TYPE_CHECKING:
    from .problem import BilevelProblem

__all__ = ["FORMAT", "check_state_devices", "differences", "layout_of", "pack", "upgrade"]

#: the checkpoint format :func:`pack` writes
FORMAT = 2
_SIDES = ("params", "hparams")
_LAYOUT_KEYS = frozenset(
    {"dtype"} | {f"{side}{suffix}" for side in _SIDES for suffix in ("", "_described", "_shapes")}
)


def layout_of(problem: BilevelProblem) -> dict[str, Any]:
    """What a state shaped like the problem depends on, as plain data (storable, comparable):
    the specs of params and hparams (:func:`~bilevel._src.pytree.plain`, and described for
    messages: a module's class shows there), the shapes of their tensors and the dtype."""
    return {
        "params": plain(problem.params_structure.spec),
        "hparams": plain(problem.hparams_structure.spec),
        "params_described": describe(problem.params_structure.spec),
        "hparams_described": describe(problem.hparams_structure.spec),
        "params_shapes": tuple(tuple(t.shape) for t in problem.theta0),
        "hparams_shapes": tuple(tuple(t.shape) for t in problem.phi0),
        "dtype": str(problem.dtype).removeprefix("torch."),
    }


def differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    """How layout ``now`` differs from ``before``, for a message (``"; "``-separated)."""
    parts = []
    for side in _SIDES:
        if before[side] != now[side] or before[f"{side}_described"] != now[f"{side}_described"]:
            parts.append(f"{side} was {before[f'{side}_described']}, now {now[f'{side}_described']}")
        if before[f"{side}_shapes"] != now[f"{side}_shapes"]:
            parts.append(
                f"{side} shapes were {_shapes(before[f'{side}_shapes'])}, "
                f"now {_shapes(now[f'{side}_shapes'])}"
            )
    if before["dtype"] != now["dtype"]:
        parts.append(f"dtype was {before['dtype']}, now {now['dtype']}")
    return "; ".join(parts)


def check_state_devices(state: Any, device: torch.device) -> None:
    """A loaded state must be on the problem's device (say so, rather than fail in an op)."""
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            if item.device != device:
                raise ValueError(
                    f"the loaded state holds tensors on {item.device}, but params and "
                    f"hparams are on {device}; load the checkpoint with "
                    f"torch.load(..., map_location={str(device)!r})"
                )
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def pack(mode: Any, signature: Any, layout: dict[str, Any] | None, state: Any) -> dict[str, Any]:
    """A checkpoint in the current format (``mode``: a name, ``signature``: a dict of strings, or
    None in checkpoints that predate them)."""
    return {"format": FORMAT, "mode": mode, "signature": signature, "layout": layout, "state": state}


def upgrade(checkpoint: Any) -> dict[str, Any]:
    """``checkpoint`` (any format this version reads) in the current format, as a new dict
    (the given one is not modified). Raises ``ValueError`` for what is not a checkpoint, and
    for a format newer than this version of bilevel writes."""
    if not isinstance(checkpoint, dict) or "state" not in checkpoint:
        raise ValueError("load_state_dict expects a dict from HyperGradient.state_dict()")
    version = checkpoint.get("format", 1)  # 0.1.0 wrote no format
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(
            f"state_dict has format {version!r}; expected a dict from HyperGradient.state_dict()"
        )
    if version > FORMAT:
        raise ValueError(
            f"state_dict has format {version}, written by a newer version of bilevel "
            f"than this one (which reads formats up to {FORMAT}); upgrade bilevel to load it"
        )
    layout = checkpoint.get("layout")
    if layout is not None:
        if not isinstance(layout, dict) or not set(layout) >= _LAYOUT_KEYS:
            raise ValueError(
                "state_dict has a malformed layout (expected the keys "
                f"{sorted(_LAYOUT_KEYS)}); pass a dict from HyperGradient.state_dict()"
            )
        # tuples, as layout_of makes them: a checkpoint passed through another serializer
        # (JSON, YAML) may hold lists, which would never compare equal
        layout = {key: _tuples(value) for key, value in layout.items()}
    return pack(checkpoint.get("mode"), checkpoint.get("signature"), layout, checkpoint["state"])


def _tuples(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tuples(v) for v in value)
    return value


def _shapes(shapes: tuple) -> str:
    return ", ".join(str(tuple(shape)) for shape in shapes)
