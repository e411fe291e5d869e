"""User structures as pytrees: a tensor, nested tuples/lists/dicts (and the other containers
``torch.utils._pytree`` knows: named tuples, ``OrderedDict``, ...) of tensors, and ``nn.Module``.

The modes and solvers work on flat tuples of tensors; users see their own structure. A module
in the structure becomes a private node type (:class:`_Module`) whose children are its
trainable parameters and whose context is plain data (class name, parameter names), so specs
compare and store without module objects. ``nn.Module`` itself stays unregistered: torch's
registry is global, and other code (``torch.compile``, user code) must keep seeing modules as
leaves.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.utils._pytree import KeyEntry, MappingKey, TreeSpec

from .binding import Members, module_members
from .typing import Tensors

__all__ = ["ModuleSlot", "Tree", "describe", "flatten", "leaf_paths", "plain"]

_PLAIN_NAMES = {tuple: "tuple", list: "list", dict: "dict"}  # the kinds 0.1.0 stored


class _Module:
    """A module inside a flattened structure: the pytree node of its trainable parameters."""

    __slots__ = ("members", "module", "names", "tensors")

    def __init__(
        self,
        module: nn.Module,
        names: tuple[str, ...],
        tensors: tuple[Tensor, ...],
        members: Members | None,
    ) -> None:
        self.module, self.names, self.tensors, self.members = module, names, tensors, members


def _module_flatten(node: _Module) -> tuple[list[Tensor], tuple[str, tuple[str, ...]]]:
    return list(node.tensors), (type(node.module).__name__, node.names)


def _module_flatten_with_keys(node: _Module) -> tuple[list[tuple[KeyEntry, Any]], Any]:
    children, context = _module_flatten(node)
    return [(MappingKey(name), t) for name, t in zip(node.names, children)], context


def _module_unflatten(children: Iterable[Tensor], context: tuple[str, tuple[str, ...]]) -> dict[str, Tensor]:
    # the context holds no module object, so the tensors come back as a name -> tensor dict
    return dict(zip(context[1], children))


if _Module not in pytree.SUPPORTED_NODES:  # a reloaded module defines a new class anyway
    pytree.register_pytree_node(
        _Module,
        _module_flatten,
        _module_unflatten,
        serialized_type_name="bilevel._src.pytree._Module",
        flatten_with_keys_fn=_module_flatten_with_keys,
    )


@dataclass(frozen=True, eq=False)
class ModuleSlot:
    """A module of a flattened structure: ``names`` of its trainable parameters (in
    ``named_parameters`` order), whose tensors are the flat leaves from ``offset`` on."""

    module: nn.Module
    names: tuple[str, ...]
    offset: int
    members: Members | None = None  # the module's walk (binding.py); None: functional_call


# how a tree rebuilds its objects: precomputed once, because BilevelProblem.call rebuilds the
# user's arguments at every loss evaluation
_FLAT, _DICT, _LEAF, _MODULE, _TREE = "flat", "dict", "leaf", "module", "tree"


class Tree:
    """How a user object was flattened: ``tree.unflatten(leaves)`` rebuilds it, with each module
    replaced by a name -> tensor dict; ``tree.call_form(leaves)`` rebuilds it with the module
    objects themselves, for closures that call them (``BilevelProblem.call`` binds the
    modules' parameters to the leaves).

    ``spec`` is plain data (no module object); two trees are equal when their specs are and
    they hold the same module objects.
    """

    __slots__ = ("_call_spec", "_form", "_hash", "_kept", "_plan", "modules", "num_leaves", "spec")

    def __init__(
        self,
        spec: TreeSpec,
        call_spec: TreeSpec,
        modules: tuple[ModuleSlot, ...],
        plan: tuple[int | nn.Module, ...],
    ) -> None:
        self.spec, self.modules, self.num_leaves = spec, modules, spec.num_leaves
        self._call_spec = call_spec  # modules as leaves
        self._plan = plan  # for each leaf of call_spec: its index in the flat leaves, or its module
        self._kept = len(modules) > 0  # a bool, not a tuple's truth: call_form is traced by dynamo
        if spec.is_leaf():
            self._form = _LEAF
        elif call_spec.is_leaf():
            self._form = _MODULE  # the whole structure is one module
        elif spec.type in (tuple, dict) and all(c.is_leaf() for c in spec.children()):
            self._form = _FLAT if spec.type is tuple else _DICT  # no module: it would be a node
        else:
            self._form = _TREE
        self._hash = hash((spec, tuple(id(s.module) for s in modules)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tree):
            return NotImplemented
        return (
            self.spec == other.spec
            and len(self.modules) == len(other.modules)
            and all(a.module is b.module for a, b in zip(self.modules, other.modules))
        )

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Tree({describe(self.spec)})"

    def unflatten(self, leaves: Sequence[Tensor]) -> Any:
        """The user's structure with ``leaves`` in place of its tensors (a module gives a
        name -> tensor dict of its trainable parameters)."""
        if self._form == _FLAT and len(leaves) == self.num_leaves:
            return tuple(leaves)  # the common case: no tree to walk
        if len(leaves) != self.num_leaves:
            raise ValueError(f"expected {self.num_leaves} tensors, got {len(leaves)}")
        if self._form == _LEAF:
            return leaves[0]
        if self._form == _DICT:
            return dict(zip(self.spec.context, leaves))
        if self._form == _MODULE:
            return dict(zip(self.modules[0].names, leaves))
        return pytree.tree_unflatten(list(leaves), self.spec)

    def call_form(self, leaves: Sequence[Tensor]) -> Any:
        """The user's structure with ``leaves`` in place of its tensors and the modules as
        objects (their parameters are not replaced here: the caller binds them)."""
        if not self._kept:
            return self.unflatten(leaves)
        if self._form == _MODULE:
            return self.modules[0].module
        if len(leaves) != self.num_leaves:
            raise ValueError(f"expected {self.num_leaves} tensors, got {len(leaves)}")
        return pytree.tree_unflatten(
            [leaves[p] if type(p) is int else p for p in self._plan], self._call_spec
        )


def flatten(obj: Any, argument: str) -> tuple[Tensors, Tree]:
    """Flatten ``obj`` into a tuple of tensors and its :class:`Tree`.

    ``argument`` names the user's argument (``"params"`` or ``"hparams"``) in error messages.
    A module contributes its parameters that require grad, in ``named_parameters`` order.
    Containers are those registered with ``torch.utils._pytree`` (dicts keep their order).
    """
    leaves, call_spec = pytree.tree_flatten(obj)
    if any(isinstance(leaf, (dict, list, tuple)) for leaf in leaves):  # subclasses pytree does not know
        obj = pytree.tree_map(_as_plain, obj)
        leaves, call_spec = pytree.tree_flatten(obj)
    if all(isinstance(leaf, Tensor) for leaf in leaves):  # no module: one pass suffices
        if not leaves:
            raise _empty(obj, argument)
        return tuple(leaves), Tree(call_spec, call_spec, (), ())
    nodes: list[Any] = []
    modules: list[ModuleSlot] = []
    plan: list[int | nn.Module] = []
    count = 0
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            nodes.append(leaf)
            plan.append(count)
            count += 1
        elif isinstance(leaf, nn.Module):
            node = _module_node(leaf, functools.partial(_path, obj, argument, len(leaves), i))
            nodes.append(node)
            modules.append(ModuleSlot(leaf, node.names, count, node.members))
            plan.append(leaf)
            count += len(node.names)
        else:
            raise _bad_leaf(leaf, _paths(obj, argument, len(leaves))[i])
    flat, spec = pytree.tree_flatten(pytree.tree_unflatten(nodes, call_spec))
    return tuple(flat), Tree(spec, call_spec, tuple(modules), tuple(plan))


def _as_plain(leaf: Any) -> Any:
    """Such a subclass as the plain container (its contents likewise), as 0.1.0 read it; the
    result comes back in the plain container too."""
    if isinstance(leaf, dict):
        return {key: pytree.tree_map(_as_plain, value) for key, value in leaf.items()}
    if isinstance(leaf, (list, tuple)):
        items = [pytree.tree_map(_as_plain, value) for value in leaf]
        return items if isinstance(leaf, list) else tuple(items)
    return leaf


def _module_node(module: nn.Module, path: Callable[[], str]) -> _Module:
    """``module`` as a node of its trainable parameters; ``path()`` names it in the error."""
    members = module_members(module)
    named: list[tuple[str, Tensor]]
    if members is None:
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    else:
        named = [(name, p) for name, (p, _) in members.parameters.items() if p.requires_grad]
    if not named:
        raise ValueError(
            f"{path()}: module {type(module).__name__} has no parameters that require "
            "grad; call .requires_grad_() on the ones to differentiate"
        )
    return _Module(module, tuple(name for name, _ in named), tuple(p for _, p in named), members)


def _path(obj: Any, argument: str, count: int, i: int) -> str:
    return _paths(obj, argument, count)[i]


def _paths(obj: Any, argument: str, count: int) -> list[str]:
    """Each leaf's place in ``obj`` (``params[0]['w']``), for error messages only."""
    try:
        return [argument + pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(obj)[0]]
    except ValueError:  # a user-registered container without keys: number the leaves
        return [f"{argument} (leaf {i})" if count > 1 else argument for i in range(count)]


def _empty(obj: Any, argument: str) -> ValueError:
    return ValueError(
        f"{argument}: no tensors found in {type(obj).__name__}; pass a tensor, "
        "a tuple/list/dict of tensors or an nn.Module with trainable parameters"
    )


def _bad_leaf(leaf: Any, path: str) -> TypeError:
    name = type(leaf).__name__
    if hasattr(leaf, "__next__") or (hasattr(leaf, "__iter__") and not isinstance(leaf, (str, bytes))):
        return TypeError(
            f"{path}: got an iterator/generator ({name}); pass a list, "
            "e.g. list(model.parameters()), so that it can be read more than once"
        )
    return TypeError(f"{path}: expected a tensor, a tuple/list/dict of tensors or an nn.Module, got {name}")


# ----------------------------------------------------------------------- specs as plain data
def _keys(spec: TreeSpec) -> list[Any] | None:
    """The keys of a dict-like node, None for other nodes."""
    if spec.type in (dict, collections.OrderedDict):
        return list(spec.context)
    if spec.type is collections.defaultdict:
        return list(spec.context[1])  # [default_factory, keys]
    return None


def _type_name(spec: TreeSpec) -> str:
    if spec.type is collections.namedtuple:  # the node type of every named tuple; the context is its class
        return spec.context.__name__
    return getattr(spec.type, "__name__", str(spec.type))


def describe(spec: TreeSpec) -> str:
    """A short human-readable description of a spec, used in error messages: ``tensor``,
    ``(tensor, [tensor])``, ``{'w': tensor}``, ``Linear(2 parameters)``, ``Point(x=tensor)``."""
    if spec.is_leaf():
        return "tensor"
    if spec.type is _Module:
        name, names = spec.context
        return f"{name}({len(names)} parameters)"
    parts = [describe(child) for child in spec.children()]
    keys = _keys(spec)
    if keys is not None:
        inner = "{" + ", ".join(f"{k!r}: {p}" for k, p in zip(keys, parts)) + "}"
        return inner if spec.type is dict else f"{_type_name(spec)}({inner})"
    if spec.type is tuple:
        return f"({', '.join(parts)})"
    if spec.type is list:
        return f"[{', '.join(parts)}]"
    if spec.type is collections.namedtuple:
        parts = [f"{field}={p}" for field, p in zip(spec.context._fields, parts)]
    return f"{_type_name(spec)}({', '.join(parts)})"


def plain(spec: TreeSpec) -> tuple:
    """A spec as nested ``(kind, keys, children)`` tuples of strings and keys: comparable
    across processes and storable in a checkpoint (``torch.load(weights_only=True)`` reads
    it). Tensors, tuples, lists, dicts and modules (``keys`` = the parameter names) give
    what 0.1.0 stored, so its checkpoints compare equal; the class name of a module is in
    :func:`describe`, which layouts store next to this."""
    if spec.is_leaf():
        return ("tensor", (), ())
    if spec.type is _Module:
        return ("module", tuple(spec.context[1]), ())
    children = tuple(plain(child) for child in spec.children())
    keys = _keys(spec)
    if spec.type in _PLAIN_NAMES:
        return (_PLAIN_NAMES[spec.type], tuple(keys or ()), children)
    if spec.type is collections.namedtuple:
        cls = spec.context
        return (f"{cls.__module__}.{cls.__qualname__}", tuple(cls._fields), children)
    kind = f"{getattr(spec.type, '__module__', '')}.{getattr(spec.type, '__qualname__', str(spec.type))}"
    return (kind, tuple(keys) if keys is not None else (repr(spec.context),), children)


def leaf_paths(tree: Tree, argument: str) -> list[str]:
    """Each leaf's place in the structure, e.g. ``hparams['a'][1]`` (``argument`` alone for a
    single tensor), in flat order."""
    numbered = pytree.tree_unflatten(list(range(tree.num_leaves)), tree.spec)
    return [argument + pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(numbered)[0]]
