"""Walks of autograd graphs (no backward pass): which tensors a loss reaches, and which
custom ``autograd.Function`` nodes it holds (suspects for a missing or silently missing
second derivative)."""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable, Hashable
from typing import Any, cast

import torch
from torch import Tensor

from .errors import HypergradientWarning, user_stacklevel
from .typing import Tensors

__all__ = ["code_of", "custom_functions", "reached", "reaches_any", "screen_once", "warn_once_differentiable"]


def _function_nodes(loss: Tensor) -> list[Any]:
    """The custom ``autograd.Function`` nodes in the graph of ``loss``."""
    found: list[Any] = []
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction) and not _is_synchronize(node):
            found.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


def custom_functions(loss: Tensor) -> str:
    """Names of custom ``autograd.Function`` nodes in the graph of ``loss`` (suspects for
    a missing double backward), as a clause for an error message."""
    names = sorted({type(node).__name__ for node in _function_nodes(loss)})
    return f" (custom autograd Functions in the graph: {', '.join(names)})" if names else ""


def reaches_any(loss: Tensor, tensors: Tensors) -> bool:
    """Whether the graph of ``loss`` reaches any of ``tensors``: :func:`reached`, stopping at
    the first (a check made on every unrolled call need not walk the whole graph)."""
    return any(reached(loss, tensors, first=True))


def reached(loss: Tensor, tensors: Tensors, first: bool = False) -> list[bool]:
    """Whether the autograd graph of ``loss`` reaches each tensor (structurally, no backward).
    A :class:`~bilevel._src.distributed.Synchronize` node passes each output to its own input."""
    nodes: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        nodes.setdefault(t.grad_fn if t.grad_fn is not None else id(t), []).append(i)
    found = [False] * len(tensors)
    seen: set[Any] = set()
    stack: list[tuple[Any, int]] = [(loss.grad_fn, 0)]
    while stack:
        node, output = stack.pop()
        through = _is_synchronize(node)
        key = (node, output) if through else node
        if node is None or key in seen:
            continue
        seen.add(key)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        for i in nodes.get(node, []) + (nodes.get(id(variable), []) if variable is not None else []):
            found[i] = True
            if first:
                return found
        edges = node.next_functions
        stack.extend([edges[output]] if through else edges)
    return found


def _is_synchronize(node: Any) -> bool:
    forward = getattr(node, "_forward_cls", None)  # custom Functions' nodes only
    if forward is None:
        return False
    from .distributed import Synchronize

    return forward is Synchronize


#: the code of every ``@once_differentiable`` backward (one wrapper, made per decorated function)
_ONCE_DIFFERENTIABLE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__
#: inner losses already screened by :func:`warn_once_differentiable` (code objects or classes)
_SCREENED: set[Hashable] = set()


def warn_once_differentiable(loss: Tensor) -> None:
    """Warn if the graph of ``loss`` holds a custom Function whose backward is marked
    ``@once_differentiable``. PyTorch runs such a backward without a graph and raises only if
    the incoming gradient itself requires grad, so a Hessian product through it usually just
    misses that op's second derivative: a silently wrong hypergradient. (A graph walk: callers
    run it once per closure, not per call.)"""
    names = sorted(
        {
            node._forward_cls.__name__
            for node in _function_nodes(loss)
            if getattr(node._forward_cls.backward, "__code__", None) is _ONCE_DIFFERENTIABLE
        }
    )
    if names:
        warnings.warn(
            f"the graph of the inner loss holds {', '.join(names)}, a custom autograd Function whose "
            "backward is marked @once_differentiable: PyTorch computes that backward without a "
            "graph, so Hessian-vector products miss its second derivative and every mode returns "
            "a wrong hypergradient, without an error. Write its backward with differentiable "
            "tensor ops and drop @once_differentiable (check the result with "
            "bilevel.testing.assert_hypergradient_close)",
            HypergradientWarning,
            stacklevel=user_stacklevel(),
        )


def code_of(function: Callable) -> Any:
    """The code object behind a function or bound method; the object itself otherwise."""
    return getattr(getattr(function, "__func__", function), "__code__", function)


def screen_once(inner_loss: Callable, loss: Tensor) -> None:
    """:func:`warn_once_differentiable` on ``loss``, once per closure code (or callable class):
    a closure made anew each step with the same code is screened once."""
    function = inner_loss
    while isinstance(function, functools.partial):  # a partial's code is its function's
        function = function.func
    code = code_of(function)
    key: Hashable = code if isinstance(code, types.CodeType) else cast(Hashable, type(function))
    if key not in _SCREENED:
        _SCREENED.add(key)
        warn_once_differentiable(loss)
