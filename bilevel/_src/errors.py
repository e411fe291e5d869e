"""Errors and warnings that name what went wrong and how to fix it."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import sys
import types
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "FiniteChecks",
    "HypergradientWarning",
    "NoDoubleBackwardError",
    "NonFiniteError",
    "PeerError",
    "SolverBreakdownError",
    "check_finite",
    "check_loss",
    "closure_runtime_error",
    "closure_type_error",
    "deferred_finite_checks",
    "second_order_guard",
    "user_stacklevel",
]


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bilevel/


def user_stacklevel() -> int:
    """The ``stacklevel`` of ``warnings.warn``, called from the package, that names the first
    frame outside it: a warning points at the user's line, however deep the call."""
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    return level


_NOT_CALLABLE = re.compile(r"'(list|tuple|dict|generator)' object is not callable")


def closure_type_error(name: str, error: TypeError) -> TypeError | None:
    """A clearer error for a closure that called a container of tensors as a module (params
    given as ``list(model.parameters())``); None for any other ``TypeError``."""
    match = _NOT_CALLABLE.search(str(error))
    if match is None:
        return None
    return TypeError(
        f"{name} called a {match.group(1)} as a module: the closures receive params and hparams "
        "in the structure they were given, so to call a model pass the module itself "
        "(params=model), not list(model.parameters()). Original error: " + str(error)
    )


# PyTorch's errors for an op whose inputs live on different devices
_DEVICE_MIXTURE = re.compile(r"same device|expected device|on different devices")
# ... and whose inputs have different floating dtypes (float32 data with float64 params)
_DTYPE_MIXTURE = re.compile(r"same dtype|same scalar type|expected scalar type")


def closure_runtime_error(
    name: str, error: RuntimeError, dtype: torch.dtype, device: torch.device
) -> Exception | None:
    """A clearer error for the closure ``name`` that mixed devices or floating dtypes with
    the params' ``dtype`` and ``device``, or None for other errors."""
    devices = _DEVICE_MIXTURE.search(str(error)) is not None
    if not devices and _DTYPE_MIXTURE.search(str(error)):
        return TypeError(
            f"{name} combined tensors of different dtypes: params and hparams are "
            f"{dtype}, so every floating tensor and module the closure uses (data, "
            f"constants) must be too; convert them with .to({dtype}). "
            f"Original error: {error}"
        )
    if not devices:
        return None
    return ValueError(
        f"{name} combined tensors on different devices: params and hparams are on "
        f"{device}, so every tensor and module the closure uses (data, targets, "
        f"constants) must be there too; move them with .to({str(device)!r}). "
        f"Original error: {error}"
    )


class NoDoubleBackwardError(TypeError):
    """An op in a loss has no second derivative in PyTorch, which the mode's products need;
    ``hvp="finite-difference"`` and ``mode="penalty"`` need first derivatives only."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared while computing a hypergradient; the message says where."""


class HypergradientWarning(UserWarning):
    """A hypergradient was computed but may be inaccurate (see the message and ``stats``)."""


class PeerError(Exception):
    """Raised with ``distributed=...`` on every rank whose peer raised in the same call (the
    peer raises its own error). Not a ``RuntimeError``: no recovery path may catch it and
    try again, which would start a collective the other ranks never join."""


class SolverBreakdownError(RuntimeError):
    """Raised instead of a warning when ``strict=True`` and a solver diverged or broke down."""


class FiniteChecks:
    """NaN/inf checks of several places in a computation, read in one host synchronisation.

    ``add`` records the tensors of a place; ``verify`` tests them all and raises
    :class:`NonFiniteError` naming the first place that failed, in the order they were added
    (a NaN propagates forward, so that is where it appeared). On a GPU each synchronisation
    drains the launch queue: one read per call instead of one per place keeps the device busy.

    The test is one fused reduction: the 2-norm of every tensor (``torch._foreach_norm``, one
    launch on CUDA), read at once. A norm is finite when the tensor is, and NaN or inf when it
    holds one; a finite tensor whose norm overflows (entries near 1e19 in float32) is then
    tested exactly, so it never raises.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[list[Tensor], str]] = []
        #: after ``verify``: the 2-norm of each place's tensors together (read in the same
        #: synchronisation, so a caller may use them for free)
        self.norms: dict[str, float] = {}

    def add(self, tensors: Sequence[Tensor | None], where: str) -> None:
        # detached: a check reads values only, and must not keep a loss's graph alive until
        # the block ends (a finite-difference call evaluates the loss at many points)
        present = [t.detach() for t in tensors if t is not None and (t.is_floating_point() or t.is_complex())]
        if present:
            self._pending.append((present, where))

    def verify(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        tensors = [t for place, _ in pending for t in place]
        with torch.no_grad():
            norms = torch._foreach_norm(tensors)
            try:
                values = torch.stack(norms).tolist()  # the one host synchronisation
            except RuntimeError:  # tensors on several devices
                values = [float(n) for n in norms]
            finite = [math.isfinite(value) for value in values]
            position = iter(values)
            for place, where in pending:
                self.norms[where] = math.sqrt(sum(next(position) ** 2 for _ in place))
            if all(finite):
                return
            suspect = iter(finite)
            for place, where in pending:
                if any(not next(suspect) and not bool(torch.isfinite(t).all()) for t in place):
                    raise NonFiniteError(
                        f"non-finite values (NaN or inf) in {where}; check the losses "
                        "and the hyperparameter values, or lower the solver step size"
                    )


_DEFERRED: contextvars.ContextVar[FiniteChecks | None] = contextvars.ContextVar(
    "bilevel_checks", default=None
)


def check_finite(tensors: Sequence[Tensor | None], where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` if any tensor holds NaN or inf; inside
    :func:`deferred_finite_checks`, when that block ends."""
    active = _DEFERRED.get()
    checks = FiniteChecks() if active is None else active
    checks.add(tensors, where)
    if active is None:
        checks.verify()


@contextlib.contextmanager
def deferred_finite_checks() -> Iterator[FiniteChecks]:
    """Queue the :func:`check_finite` calls made in the block and read them together, in one
    host synchronisation, when it ends. If the block raises, the checks are read first: a
    NaN that appeared earlier is the likelier cause, and its error names the place."""
    checks = FiniteChecks()
    token = _DEFERRED.set(checks)
    try:
        yield checks
    finally:  # also when the block raised: a NonFiniteError from here then takes its place
        _DEFERRED.reset(token)
        checks.verify()


_MISSING_DERIVATIVE = re.compile(r"derivative for '?([\w.:]+)'? is not implemented")


class second_order_guard:  # noqa: N801 (used as a function: ``with second_order_guard(...)``)
    """Turn autograd's errors about missing double backward into :class:`NoDoubleBackwardError`
    (a plain class, not a generator-based context manager: it wraps every product)."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> Literal[False]:
        if not isinstance(error, (RuntimeError, NotImplementedError)):
            return False
        message = str(error)
        match = _MISSING_DERIVATIVE.search(message)
        if match is None and "double backward" not in message and "twice" not in message:
            return False
        op = match.group(1) if match else "an op in the loss"
        raise NoDoubleBackwardError(
            f"{self.what} needs the second derivative of {op!r}, which PyTorch does not implement. "
            "Ways out that need first derivatives only: hvp='finite-difference' on an implicit "
            "mode (its Hessian products become differences of gradients, e.g. "
            "HyperGradient('implicit-cg', hvp='finite-difference')), or mode='penalty' (a "
            "first-order penalty method, biased by O(1/penalty)); or replace the op by a "
            f"twice-differentiable equivalent. Original error: {message}"
        ) from error


def check_loss(loss: Any, name: str) -> Tensor:
    """``loss`` as a scalar tensor with a graph, or an error naming the closure ``name``."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{name} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"{name} must return a scalar, got a tensor of shape {tuple(loss.shape)}; "
            "reduce it, e.g. with .mean() or .sum()"
        )
    if not loss.is_floating_point():
        raise TypeError(f"{name} must return a floating-point scalar, got {loss.dtype}")
    if not loss.requires_grad:
        raise ValueError(
            f"{name} returned a tensor without a graph: it depends on neither params "
            "nor hparams. Compute it from the arguments the closure receives "
            "(or, for modules, by calling the module), not from detached copies"
        )
    return loss if loss.dim() == 0 else loss.reshape(())
