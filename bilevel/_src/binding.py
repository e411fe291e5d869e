"""Evaluating modules at tensors of the library's choosing, without changing them.

``torch.func.functional_call`` finds at every call where each named tensor lives: it walks
the module tree for tied weights and resolves every name to its owner. On a small model that
walk costs more than the forward pass, and a MAML task evaluates its losses several times
per call. Here the tree is walked once per problem (:func:`module_members`, which also gives
``flatten`` the parameters and the problem its buffers), and a :class:`Binding` then swaps
the tensors into their owners' ``_parameters``/``_buffers`` dictionaries, the same swap that
``functional_call`` makes, and puts the originals back afterwards.

A module class that redefines how it lists its members (``named_parameters``,
``named_modules``, ...) gets no walk (``module_members`` returns None), and the problem
evaluates it with ``functional_call``, as does a traced (``torch.compile``) evaluation.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from .pytree import ModuleSlot, Tree

__all__ = ["Binding", "Members", "Place", "bind_modules", "bound_modules", "module_members"]

#: where a tensor lives: its owner's ``_parameters`` or ``_buffers`` dictionary, and its name there
Place = tuple[dict, str]

# the methods behind named_parameters() and named_buffers(): a class that redefines one may
# list other members than its dictionaries hold, so the walk would disagree with it
_LISTING = ("named_modules", "named_parameters", "named_buffers", "_named_members")
_PLAIN = tuple(getattr(nn.Module, name) for name in _LISTING)


@dataclass(frozen=True, eq=False)
class Members:
    """A module tree's parameters and buffers, each name -> (tensor, the places holding it),
    in ``named_parameters()``/``named_buffers()`` order: a weight tied across modules is listed
    once, under its first name, with every place that holds it. A parameter that is also
    registered as a buffer is a parameter held at the buffer's place too (``named_buffers()``
    would list it; a private copy of it would not follow the parameter)."""

    parameters: dict[str, tuple[Tensor, list[Place]]]
    buffers: dict[str, tuple[Tensor, list[Place]]]


# class -> whether it keeps nn.Module's listings; weak: parametrize makes a class per module
_PLAIN_CLASSES: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _lists_plainly(cls: type) -> bool:
    plain = _PLAIN_CLASSES.get(cls)
    if plain is None:
        plain = _PLAIN_CLASSES[cls] = all(getattr(cls, n) is p for n, p in zip(_LISTING, _PLAIN))
    return plain


def module_members(root: nn.Module) -> Members | None:
    """One walk over the distinct modules of ``root`` in ``named_modules()`` order (preorder,
    each module once), collecting what ``named_parameters()`` and ``named_buffers()`` list
    and where each tensor is held. None if a module's class redefines the listing."""
    parameters: dict[str, tuple[Tensor, list[Place]]] = {}
    buffers: dict[str, tuple[Tensor, list[Place]]] = {}
    # per listing, id of a tensor -> its places (the listings keep the tensors alive)
    places: tuple[dict[int, list[Place]], dict[int, list[Place]]] = ({}, {})
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if not _lists_plainly(type(module)):
            return None
        owned: tuple[dict, dict] = (module._parameters, module._buffers)
        for members, listing, where in zip(owned, (parameters, buffers), places):
            for name, tensor in members.items():
                if tensor is None:
                    continue
                held = where.get(id(tensor))
                if held is not None:  # a tied weight: one more place for the same tensor
                    held.append((members, name))
                    continue
                where[id(tensor)] = held = [(members, name)]
                listing[prefix + name] = (tensor, held)
        children = [(prefix + name + ".", m) for name, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))  # popped in order: the preorder of named_modules
    for name, (tensor, held) in list(buffers.items()):
        if id(tensor) in places[0]:  # a parameter registered as a buffer too
            places[0][id(tensor)].extend(held)
            del buffers[name]
    return Members(parameters, buffers)


class Binding:
    """Puts tensors into their places for one evaluation: ``swap(values)`` binds
    ``values[i]`` at every place of ``places[i]`` and returns what it replaced, which
    ``restore`` puts back (in reverse, so a place bound twice ends at its original)."""

    __slots__ = ("places",)

    def __init__(self, places: Sequence[list[Place]]) -> None:
        self.places = tuple(places)

    def swap(self, values: Sequence[Tensor]) -> list[Tensor]:
        replaced = []
        for value, places in zip(values, self.places):
            for members, name in places:
                replaced.append(members[name])
                members[name] = value
        return replaced

    def restore(self, replaced: list[Tensor]) -> None:
        originals = reversed(replaced)
        for places in reversed(self.places):
            for members, name in reversed(places):
                members[name] = next(originals)


def bind_modules(slots: Sequence[ModuleSlot]) -> tuple[dict[str, Tensor], Binding | None]:
    """For the modules a problem rebinds: private copies of their buffers, keyed
    ``bound.{i}.{name}`` for the i-th module, and the :class:`Binding` of those buffers
    followed by each module's ``names`` parameters, in order (None if a module has no walk)."""
    buffers: dict[str, Tensor] = {}
    places: list[list[Place]] = []
    for i, slot in enumerate(slots):
        members = slot.members
        if members is None:
            listed = list(slot.module.named_buffers())
        else:
            listed = [(name, b) for name, (b, _) in members.buffers.items()]
            places.extend(held for _, held in members.buffers.values())
        buffers.update((f"bound.{i}.{name}", b.detach().clone()) for name, b in listed)
    if any(slot.members is None for slot in slots):
        return buffers, None
    places.extend(slot.members.parameters[name][1] for slot in slots for name in slot.names)  # type: ignore[union-attr]
    return buffers, Binding(places)


def bound_modules(params: Tree, hparams: Tree, phi_tied: bool) -> list[tuple[str, ModuleSlot, int]]:
    """The modules to rebind at each evaluation: (which flat tuple, module, first leaf); tied
    hparams modules are the params' modules (or inside them), bound to θ."""
    sides = (("theta", params),) + (() if phi_tied else (("phi", hparams),))
    return [(side, s, s.offset) for side, tree in sides for s in tree.modules]
