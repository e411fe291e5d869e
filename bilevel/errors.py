"""Errors and warnings that name what went wrong and how to fix it."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch
from torch import Tensor


class NoDoubleBackwardError(TypeError):
    """An op in a loss has no second derivative in PyTorch, which every mode needs."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared while computing a hypergradient; the message says where."""


class HypergradientWarning(UserWarning):
    """A hypergradient was computed but may be inaccurate (see the message and ``stats``)."""


class SolverBreakdownError(RuntimeError):
    """Raised instead of a warning when ``strict=True`` and a solver diverged or broke down."""


def check_finite(tensors: Sequence[Tensor | None], where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` if any tensor holds NaN or inf."""
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"non-finite values (NaN or inf) in {where}; check the losses and "
                                 "the hyperparameter values, or lower the solver step size")


_MISSING_DERIVATIVE = re.compile(r"derivative for '?([\w.:]+)'? is not implemented")


@contextlib.contextmanager
def second_order_guard(what: str) -> Iterator[None]:
    """Turn autograd's errors about missing double backward into :class:`NoDoubleBackwardError`."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        message = str(error)
        match = _MISSING_DERIVATIVE.search(message)
        if match is None and "double backward" not in message and "twice" not in message:
            raise
        op = match.group(1) if match else "an op in the loss"
        raise NoDoubleBackwardError(
            f"{what} needs the second derivative of {op!r}, which PyTorch does not implement. "
            "Every hypergradient mode differentiates the inner gradient, so replace that op by a "
            "twice-differentiable equivalent (write it from elementary tensor ops); if it touches "
            "only params and not hparams, mode='implicit-identity' avoids Hessian-vector "
            f"products altogether. Original error: {message}") from error
