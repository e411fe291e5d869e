"""Errors and warnings that name what went wrong and how to fix it."""
from __future__ import annotations

import contextlib
import contextvars
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


class FiniteChecks:
    """NaN/inf checks of several places in a computation, read in one host synchronisation.

    ``add`` records the tensors of a place; ``verify`` tests them all (the scalars, such as
    the losses of an unrolled run, in one stacked test), reads the flags at once and raises
    :class:`NonFiniteError` naming the first place that failed, in the order they were added
    (a NaN propagates forward, so that is where it appeared). On a GPU each synchronisation
    drains the launch queue: one read per call instead of one per place keeps the device busy.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[list[Tensor], str]] = []

    def add(self, tensors: Sequence[Tensor | None], where: str) -> None:
        present = [t for t in tensors if t is not None]
        if present:
            self._pending.append((present, where))

    def verify(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        device = pending[0][0][0].device
        scalars, scalar_places, flags, flag_places = [], [], [], []
        with torch.no_grad():
            for place, (tensors, _) in enumerate(pending):
                for t in tensors:
                    if t.numel() == 1:  # losses: tested together, in one stacked test
                        scalars.append(t.reshape(()).to(device))
                        scalar_places.append(place)
                    else:
                        flags.append(torch.isfinite(t).all().to(device))
                        flag_places.append(place)
            parts = ([torch.isfinite(torch.stack(scalars))] if scalars else []) + \
                    ([torch.stack(flags)] if flags else [])
            results = torch.cat(parts).tolist()  # the one host synchronisation
        failed = {place for place, good in zip(scalar_places + flag_places, results) if not good}
        for place, (_, where) in enumerate(pending):
            if place in failed:
                raise NonFiniteError(f"non-finite values (NaN or inf) in {where}; check the losses and "
                                     "the hyperparameter values, or lower the solver step size")


_DEFERRED: contextvars.ContextVar[FiniteChecks | None] = contextvars.ContextVar("bilevel_checks", default=None)


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
