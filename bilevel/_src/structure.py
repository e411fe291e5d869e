"""Flatten user structures (a tensor, nested tuples/lists/dicts of tensors, an ``nn.Module``)
into a flat tuple of tensors and rebuild them.

The modes and solvers work on flat tuples; users see their own structure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

Tensors = tuple[Tensor, ...]


@dataclass(frozen=True)
class Structure:
    """How a user object was flattened: ``unflatten(flatten(obj)) == obj``.

    ``kind`` is one of ``"tensor"``, ``"tuple"``, ``"list"``, ``"dict"``, ``"module"``.
    For containers ``children`` holds the sub-structures (and ``keys`` the dict keys);
    for a module ``keys`` holds the names of its trainable parameters.
    """

    kind: str
    keys: tuple = ()
    children: tuple["Structure", ...] = ()
    module: nn.Module | None = None

    @property
    def num_leaves(self) -> int:
        if self.kind == "tensor":
            return 1
        if self.kind == "module":
            return len(self.keys)
        return sum(child.num_leaves for child in self.children)

    def unflatten(self, leaves: Sequence[Tensor], keep_modules: bool = False) -> Any:
        """Rebuild the user structure from ``leaves``. A module becomes a name -> tensor dict,
        or stays the module itself with ``keep_modules`` (its leaves are then bound elsewhere)."""
        leaves = tuple(leaves)
        if (self.kind == "tuple" and len(leaves) == len(self.children)
                and all(child.kind == "tensor" for child in self.children)):
            return leaves  # a flat tuple, the common case: called at every loss evaluation
        if len(leaves) != self.num_leaves:
            raise ValueError(f"expected {self.num_leaves} tensors, got {len(leaves)}")
        out, rest = self._build(leaves, keep_modules)
        assert not rest
        return out

    def _build(self, leaves: Tensors, keep_modules: bool) -> tuple[Any, Tensors]:
        if self.kind == "tensor":
            return leaves[0], leaves[1:]
        if self.kind == "module":
            n = len(self.keys)
            return (self.module if keep_modules else dict(zip(self.keys, leaves[:n]))), leaves[n:]
        built = []
        for child in self.children:
            value, leaves = child._build(leaves, keep_modules)
            built.append(value)
        if self.kind == "dict":
            return dict(zip(self.keys, built)), leaves
        if self.kind == "list":
            return built, leaves
        return tuple(built), leaves

    def describe(self) -> str:
        """A short human-readable description, used in error messages."""
        if self.kind == "tensor":
            return "tensor"
        if self.kind == "module":
            return f"{type(self.module).__name__}({len(self.keys)} parameters)"
        inner = ", ".join(
            (f"{k!r}: " if self.kind == "dict" else "") + c.describe()
            for k, c in zip(self.keys or range(len(self.children)), self.children)
        )
        return {"tuple": f"({inner})", "list": f"[{inner}]", "dict": f"{{{inner}}}"}[self.kind]

    def plain(self) -> tuple:
        """The containers, keys and parameter names as plain nested tuples (no module
        object): comparable across processes, and storable in a checkpoint."""
        return (self.kind, tuple(self.keys), tuple(child.plain() for child in self.children))


def flatten(obj: Any, argument: str) -> tuple[Tensors, Structure]:
    """Flatten ``obj`` into a tuple of tensors and its :class:`Structure`.

    ``argument`` names the user's argument (``"params"`` or ``"hparams"``) in error messages.
    A module contributes its parameters that require grad, in ``named_parameters`` order.
    """
    leaves: list[Tensor] = []
    structure = _flatten(obj, argument, argument, leaves)
    if not leaves:
        raise ValueError(f"{argument}: no tensors found in {type(obj).__name__}; pass a tensor, "
                         "a tuple/list/dict of tensors or an nn.Module with trainable parameters")
    return tuple(leaves), structure


def _flatten(obj: Any, argument: str, path: str, leaves: list[Tensor]) -> Structure:
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return Structure("tensor")
    if isinstance(obj, nn.Module):
        names, tensors = [], []
        for name, p in obj.named_parameters():
            if p.requires_grad:
                names.append(name)
                tensors.append(p)
        if not names:
            raise ValueError(f"{path}: module {type(obj).__name__} has no parameters that require "
                             "grad; call .requires_grad_() on the ones to differentiate")
        leaves.extend(tensors)
        return Structure("module", keys=tuple(names), module=obj)
    if isinstance(obj, dict):
        keys = tuple(obj.keys())
        children = tuple(_flatten(obj[k], argument, f"{path}[{k!r}]", leaves) for k in keys)
        return Structure("dict", keys=keys, children=children)
    if isinstance(obj, (tuple, list)):
        children = tuple(_flatten(v, argument, f"{path}[{i}]", leaves) for i, v in enumerate(obj))
        return Structure("list" if isinstance(obj, list) else "tuple", children=children)
    if hasattr(obj, "__next__") or (hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes))):
        raise TypeError(f"{path}: got an iterator/generator ({type(obj).__name__}); pass a list, "
                        "e.g. list(model.parameters()), so that it can be read more than once")
    raise TypeError(f"{path}: expected a tensor, a tuple/list/dict of tensors or an nn.Module, "
                    f"got {type(obj).__name__}")


def modules_of(structure: Structure) -> list[tuple[Structure, int]]:
    """The module structures inside ``structure`` with the offset of their first leaf."""
    found: list[tuple[Structure, int]] = []

    def walk(s: Structure, offset: int) -> int:
        if s.kind == "module":
            found.append((s, offset))
        elif s.kind in ("tuple", "list", "dict"):
            for child in s.children:
                offset = walk(child, offset)
            return offset
        return offset + s.num_leaves

    walk(structure, 0)
    return found


def tree_map(fn: Callable[..., Tensor], *trees: Tensors) -> Tensors:
    """Apply ``fn`` leaf-wise to flat tuples of tensors."""
    return tuple(fn(*leaves) for leaves in zip(*trees))


def zeros_like(tensors: Sequence[Tensor]) -> Tensors:
    return tuple(torch.zeros_like(t) for t in tensors)
