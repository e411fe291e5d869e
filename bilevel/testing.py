"""Check hypergradients against finite differences of the true response function.

The response function is ``F(φ) = g(θ*(φ), φ)`` with ``θ*(φ) = inner_solve(φ)`` supplied by
the user (a closed form, or an inner optimizer run to high precision). Its finite
differences are what every mode approximates, so they are the ground truth in unit tests::

    from bilevel.testing import assert_hypergradient_close

    def inner_solve(lam):                      # θ*(λ) of ridge regression, in closed form
        return torch.linalg.solve(X.T @ X + torch.diag(lam.exp()), X.T @ y)

    assert_hypergradient_close("implicit-cg", inner_loss, outer_loss, inner_solve, lam)

Use float64: with float32 the differences are dominated by rounding.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from ._structure import flatten
from .hypergradient import HyperGradient

_SCHEMES = {
    # offsets and weights of f(φ + k·eps·d), divided by eps
    "forward": ((0, -1.0), (1, 1.0)),
    "central": ((-1, -0.5), (1, 0.5)),
    "five-point": ((-2, 1 / 12), (-1, -2 / 3), (1, 2 / 3), (2, -1 / 12)),
}
# error ~ eps^order·|f^(order+1)| + u/eps is smallest near eps = u^(1/(order+1))
_ORDER = {"forward": 1, "central": 2, "five-point": 4}


def _default_eps(dtype: torch.dtype, scheme: str) -> float:
    return torch.finfo(dtype).eps ** (1.0 / (_ORDER[scheme] + 1))


def finite_difference_hypergradient(inner_solve: Callable[[Any], Any], outer_loss: Callable[[Any, Any], Tensor],
                                    hparams: Any, eps: float | None = None, scheme: str = "central",
                                    direction: Any = None, generator: torch.Generator | None = None) -> Any:
    """Finite-difference estimate of ``dF/dφ`` for ``F(φ) = outer_loss(inner_solve(φ), φ)``.

    Args:
        inner_solve: ``φ -> θ*(φ)`` in the structures the closures use.
        outer_loss: ``g(params, hparams) -> scalar``.
        hparams: φ: a tensor or a tuple/list/dict of tensors (never modified).
        eps: step; by default ``u^(1/(p+1))`` for machine precision ``u`` and a scheme of
            order ``p`` (about 6e-6 for central differences in float64).
        scheme: ``"central"`` (default, error O(eps²)), ``"forward"`` or ``"five-point"``.
        direction: None for the full gradient (one pair of solves per entry of φ), or a
            direction ``d`` shaped like ``hparams`` (or ``"random"``, a unit Gaussian direction
            from ``generator``) for the directional derivative ``⟨dF/dφ, d⟩`` as a 0-dim tensor.

    Returns:
        The gradient in the structure of ``hparams``, or the directional derivative.
    """
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(_SCHEMES)}, got {scheme!r}")
    leaves, structure = flatten(hparams, "hparams")
    if structure.kind == "module" or any(s.kind == "module" for s in structure.children):
        raise TypeError("hparams: finite differences need tensors, not an nn.Module; pass "
                        "dict(module.named_parameters()) and a matching inner_solve")
    dtype = leaves[0].dtype
    if dtype != torch.float64:
        warnings.warn(f"finite differences in {dtype} are noisy (rounding error ~ eps_machine/eps); "
                      "use float64 tensors for a reliable check", UserWarning, stacklevel=2)
    eps = _default_eps(dtype, scheme) if eps is None else eps
    base = tuple(t.detach().clone() for t in leaves)

    def response(shifted: tuple[Tensor, ...]) -> float:
        h = structure.unflatten(shifted)
        with torch.no_grad():
            value = outer_loss(inner_solve(h), h)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("outer_loss must return a scalar tensor")
        return float(value)

    def derivative(step: tuple[Tensor, ...]) -> float:
        total = 0.0
        for k, weight in _SCHEMES[scheme]:
            total += weight * response(tuple(b + (k * eps) * s for b, s in zip(base, step)))
        return total / eps

    if direction is not None:
        if isinstance(direction, str):
            if direction != "random":
                raise ValueError(f"direction must be a tensor structure or 'random', got {direction!r}")
            step = tuple(torch.randn(b.shape, generator=generator, dtype=b.dtype).to(b.device) for b in base)
            norm = math.sqrt(sum(float((s * s).sum()) for s in step))
            step = tuple(s / norm for s in step)
        else:
            step, step_structure = flatten(direction, "direction")
            if [s.shape for s in step] != [b.shape for b in base]:
                raise ValueError("direction must have the structure and shapes of hparams")
            step = tuple(s.detach().to(b) for s, b in zip(step, base))
        return torch.tensor(derivative(step), dtype=dtype)

    grads = []
    for i, b in enumerate(base):
        g = torch.zeros_like(b)
        for j in range(b.numel()):
            unit = tuple(torch.zeros_like(t) for t in base)
            unit[i].view(-1)[j] = 1.0
            g.view(-1)[j] = derivative(unit)
        grads.append(g)
    return structure.unflatten(grads)


def assert_hypergradient_close(hg_or_mode: HyperGradient | str, inner_loss: Callable, outer_loss: Callable,
                               inner_solve: Callable, hparams: Any, rtol: float = 1e-5, atol: float = 1e-8,
                               eps: float | None = None, scheme: str = "central",
                               direction: Any = None) -> tuple[Any, Any]:
    """Assert that a mode's hypergradient at ``θ*(φ) = inner_solve(φ)`` matches finite differences.

    ``hg_or_mode`` is a :class:`~bilevel.HyperGradient` or a mode name (used at its defaults).
    Passes when ‖computed − fd‖ ≤ atol + rtol·‖fd‖ (norms over all entries). On failure raises
    ``AssertionError`` with the relative error, the cosine similarity and the worst entries.
    With ``direction`` only the directional derivatives are compared (for large φ).
    Returns ``(computed, finite_difference)``.
    """
    hg = HyperGradient(hg_or_mode) if isinstance(hg_or_mode, str) else hg_or_mode
    with torch.no_grad():
        solved = inner_solve(hparams)
    params_leaves, params_structure = flatten(solved, "inner_solve(hparams)")
    params = params_structure.unflatten([t.detach().clone().requires_grad_() for t in params_leaves])
    computed = hg.compute(inner_loss, outer_loss, params, hparams)
    fd = finite_difference_hypergradient(inner_solve, outer_loss, hparams, eps=eps, scheme=scheme,
                                         direction=direction)
    got, _ = flatten(computed, "computed")
    expected, structure = flatten(fd, "fd")
    if direction is not None:
        step, _ = flatten(direction, "direction") if not isinstance(direction, str) else (None, None)
        if step is None:
            raise ValueError("assert_hypergradient_close needs an explicit direction tensor, not 'random'")
        got = (sum((g * s.to(g)).sum() for g, s in zip(got, step)).reshape(()),)
        computed = got[0]
    a = torch.cat([t.reshape(-1) for t in got]).double()
    b = torch.cat([t.reshape(-1) for t in expected]).double()
    error = float((a - b).norm())
    if error <= atol + rtol * float(b.norm()):
        return computed, fd
    relative = error / max(float(b.norm()), 1e-300)
    cosine = float(a @ b) / max(float(a.norm() * b.norm()), 1e-300)
    worst = torch.argsort((a - b).abs(), descending=True)[:5]
    names = [f"{k}" for k in _leaf_names(structure, [t.numel() for t in expected])]
    rows = "\n".join(f"    {names[int(i)]:>16}: computed {float(a[i]): .6e}  fd {float(b[i]): .6e}" for i in worst)
    raise AssertionError(
        f"hypergradient of mode {hg.mode.name!r} does not match finite differences "
        f"({scheme}, eps={eps if eps is not None else _default_eps(b.dtype, scheme):.1e}):\n"
        f"  relative error {relative:.3e} (rtol {rtol:g}, atol {atol:g}), cosine {cosine:.6f}\n"
        f"  worst entries:\n{rows}\n  solver stats: {hg.stats}")


def _leaf_names(structure, sizes: list[int]) -> list[str]:
    """Readable names of every scalar entry: hparams[leaf][index]."""
    names = []
    for leaf, size in enumerate(sizes):
        prefix = f"[{leaf}]" if len(sizes) > 1 else ""
        if structure.kind == "dict" and len(structure.keys) == len(sizes):
            prefix = f"[{structure.keys[leaf]!r}]"
        names.extend(f"hparams{prefix}[{j}]" for j in range(size))
    return names
