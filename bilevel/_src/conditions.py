"""Inner solutions stated by an equation instead of a loss: ``Root(F)`` and ``FixedPoint(T)``.

    Root(F):        θ*(φ) solves F(θ, φ) = 0;   G = F,             J = ∂F/∂θ
    FixedPoint(T):  θ*(φ) solves θ = T(θ, φ);   G = θ − T(θ, φ),   J = I − ∂T/∂θ

Either goes where ``inner_loss`` is accepted; the problem is then a :class:`BilevelProblem`
with the public ``stationarity`` hook set to ``G``, so implicit modes differentiate
``dg/dφ = ∂g/∂φ − (∂G/∂φ)ᵀ x`` with ``Jᵀ x = ∂g/∂θ`` (non-symmetric unless
``Root(F, symmetric=True)``), and unrolled modes on a ``FixedPoint`` run ``θ ← T(θ, φ)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor

from .distributed import VALUE
from .problem import BilevelProblem
from .pytree import Tree, describe, flatten
from .typing import Closure, Tensors

__all__ = ["Condition", "ConditionProblem", "FixedPoint", "Root", "make_problem", "residual_map"]

#: ``(params, hparams) -> the structure of params``
Map = Callable[[Any, Any], Any]


class Root:
    """The inner solution as a root: ``θ*(φ)`` solves ``F(θ*, φ) = 0``.

    ``F(params, hparams)`` returns the structure of ``params`` (a module: a name -> tensor
    dict of its trainable parameters, or a flat tuple in ``named_parameters`` order); it is
    evaluated like the losses, at fresh leaves with modules bound, and differentiated
    through, so a gradient computed inside with ``torch.autograd.grad`` needs
    ``create_graph=True``. ``symmetric=True`` declares ``∂F/∂θ`` symmetric (``F`` is the
    gradient of some loss): then the modes for symmetric systems (``implicit-cg``, ...) apply.
    """

    def __init__(self, fn: Map, *, symmetric: bool = False) -> None:
        _check_callable(fn, "Root(F): F")
        if not isinstance(symmetric, bool):
            raise TypeError(f"Root(F, symmetric=...): expected True or False, got {symmetric!r}")
        self.fn, self.symmetric = fn, symmetric

    def __repr__(self) -> str:
        return f"Root({getattr(self.fn, '__name__', self.fn)!r}, symmetric={self.symmetric})"


class FixedPoint:
    """The inner solution as a fixed point: ``θ*(φ) = T(θ*, φ)`` (a proximal or projected
    gradient step, an equilibrium layer, any solver's update). ``T(params, hparams)`` returns
    the structure of ``params``, evaluated as ``Root``'s ``F``; the implicit system has
    ``J = I − ∂T/∂θ``, and unrolled modes run ``θ_{t+1} = T(θ_t, φ)`` from ``params``."""

    def __init__(self, fn: Map) -> None:
        _check_callable(fn, "FixedPoint(T): T")
        self.fn = fn
        self.symmetric = False

    def __repr__(self) -> str:
        return f"FixedPoint({getattr(self.fn, '__name__', self.fn)!r})"


Condition = Root | FixedPoint


class ConditionProblem(BilevelProblem):
    """A :class:`BilevelProblem` whose inner solution is a ``Root`` or a ``FixedPoint``: the
    ``stationarity`` hook is ``G`` of the module docstring, and ``condition`` is kept for the
    modes that read it (the unrolled modes run a ``FixedPoint``'s map)."""

    def __init__(self, condition: Condition, outer_loss: Closure, params: Any, hparams: Any) -> None:
        if not isinstance(condition, (Root, FixedPoint)):
            raise TypeError(f"expected a bilevel.Root or bilevel.FixedPoint, got {type(condition).__name__}")
        self.condition = condition
        super().__init__(
            None,
            outer_loss,
            params,
            hparams,
            stationarity=residual_map(condition),
            symmetric=condition.symmetric,
        )
        if isinstance(condition, FixedPoint):
            self.add_closure("fixed_point", condition.fn)

    def fixed_point_step(self, theta: Tensors, phi: Tensors) -> Tensors:
        """``T(θ, φ)`` flattened in the order of params (a ``FixedPoint`` problem only)."""
        value = self.evaluate("fixed_point", theta, phi)
        out = aligned(value, self.params_structure, theta, "FixedPoint(T): T")
        if self.channel is None:
            return out
        # data parallel: the map of the global batch is the mean of the ranks' maps (exact for
        # a data term that enters T linearly, as in a gradient step); values averaged too
        return tuple(self.channel.mean(out, [t.shape for t in out], VALUE))


def make_problem(
    inner: Closure | Condition, outer_loss: Closure, params: Any, hparams: Any
) -> BilevelProblem:
    """The problem of ``compute``/``backward``: from an inner loss, a ``Root`` or a ``FixedPoint``."""
    if isinstance(inner, (Root, FixedPoint)):
        return ConditionProblem(inner, outer_loss, params, hparams)
    return BilevelProblem(inner, outer_loss, params, hparams)


def residual_map(condition: Condition) -> Callable[[Any, Any], Tensors]:
    """``G(params, hparams)`` as flat leaves in the order of params: ``F`` for a root,
    ``θ − T(θ, φ)`` for a fixed point (zero at the inner solution)."""
    fn, what = condition.fn, "Root(F): F" if isinstance(condition, Root) else "FixedPoint(T): T"
    fixed_point = isinstance(condition, FixedPoint)

    def g(params: Any, hparams: Any) -> Tensors:
        theta, tree = flatten(params, "params")  # modules: bound to the point of evaluation
        out = aligned(fn(params, hparams), tree, theta, what)
        return tuple(t - o for t, o in zip(theta, out)) if fixed_point else out

    return g


def aligned(out: Any, tree: Tree, theta: Tensors, what: str) -> Tensors:
    """``out`` (the structure of params, dicts in any key order, or a flat sequence in the
    order of params) as flat leaves aligned with ``theta``; raises naming the mismatch."""
    expected = tree.unflatten(theta)  # modules as name -> tensor dicts
    flat, spec = pytree.tree_flatten(out)
    leaves: list[Any] | None = flat
    _, want = pytree.tree_flatten(expected)
    if spec != want and not (isinstance(out, (tuple, list)) and len(out) == len(theta)):
        leaves = _by_path(out, expected)
    if (
        leaves is None
        or len(leaves) != len(theta)
        or any(not isinstance(o, Tensor) or o.shape != t.shape for o, t in zip(leaves, theta))
    ):
        got = [tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in pytree.tree_leaves(out)]
        raise ValueError(
            f"{what} must return the structure of params ({describe(want)}, shapes "
            f"{[tuple(t.shape) for t in theta]}), got {describe(spec)} with {got}; a module "
            "gives a name -> tensor dict of its trainable parameters"
        )
    return tuple(leaves)


def _by_path(out: Any, expected: Any) -> list[Any] | None:
    """The leaves of ``out`` in the order of ``expected``'s, matched by their paths (dicts
    built in another key order); None if the paths differ."""
    got = {pytree.keystr(p): leaf for p, leaf in pytree.tree_flatten_with_path(out)[0]}
    paths = [pytree.keystr(p) for p, _ in pytree.tree_flatten_with_path(expected)[0]]
    if sorted(paths) != sorted(got):
        return None
    return [got[p] for p in paths]


def _check_callable(fn: Any, what: str) -> None:
    if not callable(fn):
        raise TypeError(
            f"{what} must be a callable (params, hparams) -> the structure of params, got {type(fn).__name__}"
        )
