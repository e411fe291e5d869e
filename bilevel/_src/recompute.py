"""Refusing a module that runs outside the evaluation of the closures: recomputed activations.

The library evaluates a module at its own tensors by binding them for the duration of a
closure's evaluation (binding.py). Activation checkpointing (``torch.utils.checkpoint``, or
Hugging Face's ``gradient_checkpointing_enable()``) recomputes a block's forward later, in a
backward pass, when the module holds its own parameters again: the derivatives through that
block would silently be taken at the wrong point. (The reentrant form already raises in
``autograd.grad``; the non-reentrant one does not.)

So a ``HyperGradient``'s first call with a set of closures (by their code, until a call with
them succeeds) runs with a forward pre-hook on every module: a module of the problem's that
runs in the calling thread while no closure is being evaluated raises :class:`ValueError`.
Its later calls with the same closures run without the hook, which costs about a
microsecond per module call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from .graph import code_of
from .problem import BilevelProblem

__all__ = ["recompute_guard"]


class _Guard:
    """The hook and the count of evaluations in progress; also the context each evaluation
    runs in (around the problem's own context, if it has one)."""

    def __init__(
        self, problem: BilevelProblem, modules: list[nn.Module], key: int, screened: set[int]
    ) -> None:
        self.problem, self.key, self.screened = problem, key, screened
        self.depth, self.thread = 0, threading.get_ident()
        self.ids = {id(m) for root in modules for m in root.modules()}
        self.outer: Callable[[], Any] | None = problem.context

    def __enter__(self) -> _Guard:
        self.handle = register_module_forward_pre_hook(self._check)
        self.problem.context = self._evaluation
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.handle.remove()
        self.problem.context = self.outer
        if kind is None:  # a call that raised screens again next time
            self.screened.add(self.key)

    @contextlib.contextmanager
    def _evaluation(self) -> Any:
        self.depth += 1
        try:
            with self.outer() if self.outer is not None else contextlib.nullcontext():
                yield
        finally:
            self.depth -= 1

    def _check(self, module: nn.Module, args: Any) -> None:
        if self.depth == 0 and id(module) in self.ids and threading.get_ident() == self.thread:
            raise ValueError(
                f"{type(module).__name__}, a module of params or hparams, ran its forward outside "
                "the evaluation of the closures (in a backward pass): activation checkpointing "
                "(torch.utils.checkpoint, gradient_checkpointing_enable()) recomputes it there at "
                "the module's own parameters, not at the ones the library evaluates it at, so "
                "the derivatives through it would be wrong. Turn activation checkpointing off for "
                "this model; the unrolled modes bound their memory with checkpoint=... instead"
            )


def recompute_guard(problem: BilevelProblem, screened: set[int]) -> contextlib.AbstractContextManager:
    """The guard for a call on ``problem``: a :class:`_Guard` unless the code of its closures
    is in ``screened`` (the caller's record of its successful calls; the guard adds it) or it
    evaluates no module, a null context then."""
    modules = [
        s.module for tree in (problem.params_structure, problem.hparams_structure) for s in tree.modules
    ]
    if not modules:
        return contextlib.nullcontext()
    # a hash: the HyperGradient that keeps it stays picklable (code objects are not)
    key = hash(tuple(code_of(closure) for closure in problem.closures().values()))
    return contextlib.nullcontext() if key in screened else _Guard(problem, modules, key, screened)
