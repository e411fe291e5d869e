"""Finite differences of the response function ``F(φ) = g(θ*(φ), φ)``: the reference that
:mod:`bilevel.testing` compares hypergradients with (its docstring states the step rule)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import user_stacklevel
from .pytree import Tree, flatten
from .typing import Tensors

__all__ = [
    "Direction",
    "default_eps",
    "direction_leaves",
    "finite_difference",
    "finite_difference_hypergradient",
    "random_direction",
    "tensor_leaves",
    "warn_precision",
]

# scheme -> (order, ((offset k, weight w), ...)): F'(φ)·d ≈ Σ w·F(φ + k·h·d) / h
_SCHEMES: dict[str, tuple[int, tuple[tuple[int, float], ...]]] = {
    "forward": (1, ((0, -1.0), (1, 1.0))),
    "central": (2, ((-1, -0.5), (1, 0.5))),
    "five-point": (4, ((-2, 1 / 12), (-1, -2 / 3), (1, 2 / 3), (2, -1 / 12))),
}


Direction = Any  # None, "random", or a tensor structure shaped like hparams


def default_eps(dtype: torch.dtype, scheme: str = "central") -> float:
    """The relative step ``u^(1/(p+1))`` for machine epsilon ``u`` of ``dtype`` and a scheme of
    order ``p`` (see the module docstring for the error analysis)."""
    order, _ = _scheme(scheme)
    return torch.finfo(dtype).eps ** (1.0 / (order + 1))


def random_direction(hparams: Any, generator: torch.Generator | int | None = None) -> Any:
    """A unit-norm Gaussian direction in the structure, dtype and device of ``hparams``,
    drawn on the CPU from ``generator`` (a ``torch.Generator`` or an int seed; default seed 0)
    so that the same seed gives the same direction on every device."""
    leaves, structure = tensor_leaves(hparams)
    if generator is None or isinstance(generator, int):
        generator = torch.Generator().manual_seed(0 if generator is None else generator)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator: expected a torch.Generator or an int seed, got {type(generator).__name__}"
        )
    draws = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in leaves]
    total = math.sqrt(sum(float((d * d).sum()) for d in draws))
    return structure.unflatten(
        [(d / total).to(dtype=t.dtype, device=t.device) for d, t in zip(draws, leaves)]
    )


def finite_difference_hypergradient(
    inner_solve: Callable[[Any], Any],
    outer_loss: Callable[[Any, Any], Tensor],
    hparams: Any,
    eps: float | None = None,
    scheme: str = "central",
    direction: Direction = None,
    generator: torch.Generator | int | None = None,
) -> Any:
    """Finite-difference estimate of ``dF/dφ`` for ``F(φ) = outer_loss(inner_solve(φ), φ)``.

    Args:
        inner_solve: ``φ -> θ*(φ)``, in the structures the closures use; it receives detached
            copies of the hparams (so it may run its own autograd-based solver).
        outer_loss: ``g(params, hparams) -> scalar``, evaluated under ``torch.no_grad``.
        hparams: φ: a tensor or a (nested) tuple/list/dict of tensors; never modified.
        eps: relative step (entry i moves by ``eps·max(1, |φᵢ|)``); default
            :func:`default_eps` (6.1e-6 for central differences in float64).
        scheme: ``"central"`` (default; error O(eps²), 2 solves per derivative),
            ``"forward"`` (O(eps), 1 solve plus one shared base solve) or ``"five-point"``
            (O(eps⁴), 4 solves).
        direction: None for the full gradient (solves for every entry of φ), or a direction
            ``d`` shaped like ``hparams`` for the directional derivative ``⟨dF/dφ, d⟩`` (for
            large φ), or ``"random"`` for ``d = random_direction(hparams, generator)``.
        generator: the seed or ``torch.Generator`` of ``direction="random"``.

    Returns:
        The gradient in the structure, dtype and device of ``hparams``, or the directional
        derivative as a 0-dim tensor.

    Example::

        phi = torch.tensor([0.3, -1.2], dtype=torch.float64)
        fd = finite_difference_hypergradient(lambda h: h ** 2, lambda w, h: torch.sin(w).sum(), phi)
        # fd ≈ cos(phi ** 2) * 2 * phi
    """
    leaves, structure = tensor_leaves(hparams)
    warn_precision(leaves[0].dtype)
    step_dir = direction_leaves(direction, hparams, leaves, generator)
    return finite_difference(inner_solve, outer_loss, leaves, structure, eps, scheme, step_dir)


def _scheme(scheme: str) -> tuple[int, tuple[tuple[int, float], ...]]:
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(map(repr, _SCHEMES))}, got {scheme!r}")
    return _SCHEMES[scheme]


def tensor_leaves(hparams: Any) -> tuple[Tensors, Tree]:
    leaves, structure = flatten(hparams, "hparams")
    if structure.modules:
        raise TypeError(
            "hparams: finite differences need tensors, not an nn.Module; pass "
            "dict(module.named_parameters()) and an inner_solve/outer_loss that take it"
        )
    for i, t in enumerate(leaves):
        if not t.is_floating_point():
            raise TypeError(f"hparams[{i}]: expected a floating-point tensor, got {t.dtype}")
        if t.dtype != leaves[0].dtype or t.device != leaves[0].device:
            raise ValueError(
                f"hparams[{i}] is {t.dtype} on {t.device} but hparams[0] is "
                f"{leaves[0].dtype} on {leaves[0].device}; use one dtype and device"
            )
    return leaves, structure


def warn_precision(dtype: torch.dtype) -> None:
    if dtype != torch.float64:
        warnings.warn(
            f"finite differences in {dtype} are noisy (rounding error ~ u/eps with "
            f"u = {torch.finfo(dtype).eps:.1e}); use float64 hparams and inner solutions "
            "for a reliable check",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def direction_leaves(
    direction: Direction, hparams: Any, leaves: Tensors, generator: torch.Generator | int | None
) -> Tensors | None:
    if direction is None:
        return None
    if isinstance(direction, str):
        if direction != "random":
            raise ValueError(
                f"direction must be None, 'random' or a tensor structure like hparams, got {direction!r}"
            )
        direction = random_direction(hparams, generator)
    steps, _ = flatten(_aligned(direction, hparams), "direction")
    if [s.shape for s in steps] != [t.shape for t in leaves]:
        raise ValueError(
            f"direction: expected tensors of shapes {[tuple(t.shape) for t in leaves]} "
            f"(those of hparams), got {[tuple(s.shape) for s in steps]}"
        )
    steps = tuple(s.detach().to(dtype=t.dtype, device=t.device) for s, t in zip(steps, leaves))
    if not any(bool(s.any()) for s in steps):
        raise ValueError("direction is zero; pass a nonzero direction")
    return steps


def _aligned(direction: Any, hparams: Any, path: str = "direction") -> Any:
    """``direction`` in the structure of ``hparams``, dict entries matched by key (not by
    position: a dict written in another key order is the same direction)."""
    if isinstance(hparams, dict):
        if not isinstance(direction, dict) or set(direction) != set(hparams):
            got = (
                f"keys {list(direction)}" if isinstance(direction, dict) else f"a {type(direction).__name__}"
            )
            raise ValueError(f"{path}: expected a dict with the keys of hparams, {list(hparams)}, got {got}")
        return {k: _aligned(direction[k], hparams[k], f"{path}[{k!r}]") for k in hparams}
    if isinstance(hparams, (tuple, list)):
        if not isinstance(direction, (tuple, list)) or len(direction) != len(hparams):
            got = (
                f"length {len(direction)}"
                if isinstance(direction, (tuple, list))
                else f"a {type(direction).__name__}"
            )
            raise ValueError(
                f"{path}: expected a tuple or list of {len(hparams)} entries, like hparams, got {got}"
            )
        return [_aligned(d, h, f"{path}[{i}]") for i, (d, h) in enumerate(zip(direction, hparams))]
    return direction


def finite_difference(
    inner_solve: Callable[[Any], Any],
    outer_loss: Callable[[Any, Any], Tensor],
    leaves: Tensors,
    structure: Tree,
    eps: float | None,
    scheme: str,
    direction: Tensors | None,
) -> Any:
    _, stencil = _scheme(scheme)
    eps = default_eps(leaves[0].dtype, scheme) if eps is None else eps
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    base = tuple(t.detach().clone() for t in leaves)
    cache: dict[int, float] = {}

    def response(shifted: Tensors) -> float:
        h = structure.unflatten(shifted)
        returned = inner_solve(h)
        solved, solved_structure = flatten(returned, "inner_solve(hparams)")
        # a module is the closures' argument as returned (evaluated under no_grad below)
        params = (
            returned if solved_structure.modules else solved_structure.unflatten([t.detach() for t in solved])
        )
        with torch.no_grad():
            value = outer_loss(params, h)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(
                "outer_loss must return a scalar tensor, got "
                f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}"
            )
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(
                f"outer_loss(inner_solve(hparams), hparams) is {number} at a perturbed "
                f"hparams (finite-difference step {eps:g}); lower eps or check inner_solve"
            )
        return number

    def derivative(move: Callable[[float], Tensors], step: float) -> float:
        total = 0.0
        for k, weight in stencil:
            if k == 0:  # the unperturbed point, shared by every entry of a forward scheme
                if 0 not in cache:
                    cache[0] = response(base)
                total += weight * cache[0]
            else:
                total += weight * response(move(k * step))
        return total / step

    if direction is not None:
        largest = max(float(d.abs().max()) for d in direction)
        scale = max([1.0] + [float(t.abs().max()) for t in base])
        step = eps * scale / largest
        value = derivative(lambda s: tuple(b + s * d for b, d in zip(base, direction)), step)
        return torch.tensor(value, dtype=base[0].dtype, device=base[0].device)

    grads = []
    for i, b in enumerate(base):
        flat_b = b.reshape(-1)
        g = torch.empty(b.numel(), dtype=torch.float64)
        for j in range(b.numel()):
            x = flat_b[j]
            # the step actually taken after rounding, so that (x + h) − x = h exactly
            h = float((x + eps * max(1.0, abs(float(x)))) - x)
            if h == 0.0:
                raise ValueError(
                    f"eps={eps:g} is below the resolution of {b.dtype} at hparams "
                    f"entry {float(x):g}; use a larger eps"
                )

            def move(s: float, i: int = i, j: int = j, flat_b: Tensor = flat_b, b: Tensor = b) -> Tensors:
                shifted = flat_b.clone()
                shifted[j] += s
                return base[:i] + (shifted.reshape(b.shape),) + base[i + 1 :]

            g[j] = derivative(move, h)
        grads.append(g.to(dtype=b.dtype, device=b.device).reshape(b.shape))
    return structure.unflatten(grads)
