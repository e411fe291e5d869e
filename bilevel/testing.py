"""Check hypergradients against finite differences of the true response function.

The response function is ``F(φ) = g(θ*(φ), φ)`` with ``θ*(φ) = inner_solve(φ)`` supplied by
the user (a closed form, or an inner solver run to high precision). Its finite differences
are what every mode approximates, so they are the ground truth in unit tests::

    import torch
    from bilevel.testing import assert_hypergradient_close

    X, y = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    Xv, yv = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    inner_loss = lambda w, lam: 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w ** 2).sum()
    outer_loss = lambda w, lam: 0.5 * ((Xv @ w - yv) ** 2).mean()

    def inner_solve(lam):                      # θ*(λ) of ridge regression, in closed form
        return torch.linalg.solve(X.T @ X / 40 + torch.diag(lam.exp()), X.T @ y / 40)

    lam = torch.full((5,), -1.0, dtype=torch.float64)
    assert_hypergradient_close("implicit-cg", inner_loss, outer_loss, inner_solve, lam)

Use float64: in float32 the differences are dominated by rounding (a warning says so).

Choice of the step. A scheme of order p has truncation error ~ eps^p·|F^(p+1)| and rounding
error ~ u·|F|/eps when F is computed to relative precision u (machine epsilon; ``inner_solve``
must be that accurate too). For unit-scaled F the sum is smallest at eps = u^(1/(p+1)), with
error ~ u^(p/(p+1)): in float64 eps ≈ 1.5e-8 (forward, error ~1e-8), 6.1e-6 (central, ~4e-11)
and 7.4e-4 (five-point, ~3e-13). ``eps`` is relative: entry i moves by eps·max(1, |φᵢ|), and
the derivative is divided by the step actually taken after rounding.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._src.hypergradient import HyperGradient
from ._src.pytree import Tree, flatten, leaf_paths
from ._src.typing import Tensors

__all__ = ["assert_hypergradient_close", "default_eps", "finite_difference_hypergradient",
           "random_direction"]

# scheme -> (order, ((offset k, weight w), ...)): F'(φ)·d ≈ Σ w·F(φ + k·h·d) / h
_SCHEMES: dict[str, tuple[int, tuple[tuple[int, float], ...]]] = {
    "forward": (1, ((0, -1.0), (1, 1.0))),
    "central": (2, ((-1, -0.5), (1, 0.5))),
    "five-point": (4, ((-2, 1 / 12), (-1, -2 / 3), (1, 2 / 3), (2, -1 / 12))),
}
# default (rtol, atol) of assert_hypergradient_close: float64, and anything less precise
_TOLERANCES = {torch.float64: (1e-5, 1e-8)}
_LOW_PRECISION_TOLERANCES = (1e-2, 1e-4)

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
    leaves, structure = _tensor_leaves(hparams)
    if generator is None or isinstance(generator, int):
        generator = torch.Generator().manual_seed(0 if generator is None else generator)
    elif not isinstance(generator, torch.Generator):
        raise TypeError("generator: expected a torch.Generator or an int seed, "
                        f"got {type(generator).__name__}")
    draws = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in leaves]
    total = math.sqrt(sum(float((d * d).sum()) for d in draws))
    return structure.unflatten([(d / total).to(dtype=t.dtype, device=t.device)
                                for d, t in zip(draws, leaves)])


def finite_difference_hypergradient(inner_solve: Callable[[Any], Any],
                                    outer_loss: Callable[[Any, Any], Tensor], hparams: Any,
                                    eps: float | None = None, scheme: str = "central",
                                    direction: Direction = None,
                                    generator: torch.Generator | int | None = None) -> Any:
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
    leaves, structure = _tensor_leaves(hparams)
    _warn_precision(leaves[0].dtype)
    step_dir = _direction_leaves(direction, hparams, leaves, generator)
    return _finite_difference(inner_solve, outer_loss, leaves, structure, eps, scheme, step_dir)


def assert_hypergradient_close(hg_or_mode: HyperGradient | str, inner_loss: Callable[[Any, Any], Tensor],
                               outer_loss: Callable[[Any, Any], Tensor], inner_solve: Callable[[Any], Any],
                               hparams: Any, rtol: float | None = None, atol: float | None = None,
                               eps: float | None = None, scheme: str = "central", direction: Direction = None,
                               generator: torch.Generator | int | None = None) -> tuple[Any, Any]:
    """Assert that a mode's hypergradient at ``θ*(φ) = inner_solve(φ)`` matches finite differences.

    Computes ``params = inner_solve(hparams)`` (detached leaves that require grad), the
    hypergradient with ``hg_or_mode`` (a :class:`~bilevel.HyperGradient`, or a mode name used
    at its defaults) at ``hparams`` (which need not require grad, and are left untouched), and
    :func:`finite_difference_hypergradient`. Passes when
    ``‖computed − fd‖ ≤ atol + rtol·‖fd‖`` (norms over all entries); with ``direction`` the
    directional derivatives ``⟨computed, d⟩`` and the FD one are compared instead.

    Default tolerances: ``rtol=1e-5, atol=1e-8`` in float64, well above the ~1e-10 accuracy of
    central differences on a well-scaled problem and far below the O(1) errors of a wrong
    sign, scale or missing term; an iterative mode must be run to a matching tolerance.
    In lower precision ``rtol=1e-2, atol=1e-4``.

    Raises:
        AssertionError: with the mode, the relative error, the cosine similarity, the norms,
            the worst entries (``hparams['key'][i, j]``), the FD scheme and step, the norm of
            ``∇θ inner_loss`` at ``inner_solve(hparams)`` (an inaccurate inner solve shows
            there), and the mode's stats.

    Returns:
        ``(computed, fd)``: the library's hypergradient in the structure of ``hparams``, and
        the finite-difference estimate (same structure, or a 0-dim tensor with ``direction``).

    Example::

        hg = HyperGradient("implicit-cg", iters=100, tol=1e-10)
        assert_hypergradient_close(hg, inner_loss, outer_loss, inner_solve, hparams)
        assert_hypergradient_close("implicit-exact", inner_loss, outer_loss, inner_solve,
                                   hparams, direction="random")   # for large hparams
    """
    hg = _hypergradient(hg_or_mode)
    leaves, structure = _tensor_leaves(hparams)
    dtype = leaves[0].dtype
    _warn_precision(dtype)
    default_rtol, default_atol = _TOLERANCES.get(dtype, _LOW_PRECISION_TOLERANCES)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    step_dir = _direction_leaves(direction, hparams, leaves, generator)

    # the user's hparams where they require grad (options such as lr=that_tensor refer to them;
    # compute() never modifies them), detached views that do otherwise
    phi = structure.unflatten([t if t.requires_grad else t.detach().requires_grad_() for t in leaves])
    solved, solved_structure = flatten(inner_solve(structure.unflatten([t.detach().clone() for t in leaves])),
                                       "inner_solve(hparams)")
    params_leaves = tuple(t.detach().clone().requires_grad_() for t in solved)
    params = solved_structure.unflatten(params_leaves)
    computed = hg.compute(inner_loss, outer_loss, params, phi)
    fd = _finite_difference(inner_solve, outer_loss, leaves, structure, eps, scheme, step_dir)

    a, b = _compared(computed, fd, step_dir)
    error, fd_norm = float((a - b).norm()), float(b.norm())
    if error <= atol + rtol * fd_norm:
        return computed, fd
    step = default_eps(dtype, scheme) if eps is None else eps
    with torch.enable_grad():  # implicit modes assume ∇θ f = 0 at inner_solve(hparams): show how close
        grads = torch.autograd.grad(inner_loss(params, phi), params_leaves, allow_unused=True)
    stationarity = math.sqrt(sum(float((g * g).sum()) for g in grads if g is not None))
    raise AssertionError(_report(hg, a, b, error, fd_norm, rtol, atol, scheme, step, step_dir is not None,
                                 _entry_names(structure, leaves), stationarity))


# ------------------------------------------------------------------------------ internals
def _hypergradient(hg_or_mode: HyperGradient | str) -> HyperGradient:
    if isinstance(hg_or_mode, str):
        return HyperGradient(hg_or_mode)
    if isinstance(hg_or_mode, HyperGradient):
        return hg_or_mode
    raise TypeError("hg_or_mode: expected a HyperGradient or a mode name such as 'implicit-cg', "
                    f"got {type(hg_or_mode).__name__}")


def _compared(computed: Any, fd: Any, step_dir: Tensors | None) -> tuple[Tensor, Tensor]:
    """The computed and FD hypergradients as float64 CPU vectors (all entries, or the one
    directional derivative along ``step_dir``)."""
    got, _ = flatten(computed, "computed")
    if step_dir is None:
        a = torch.cat([t.detach().reshape(-1) for t in got]).double().cpu()
        b = torch.cat([t.reshape(-1) for t in flatten(fd, "fd")[0]]).double().cpu()
        return a, b
    along = sum((g.detach().double() * d.double()).sum() for g, d in zip(got, step_dir))
    return torch.as_tensor(along).reshape(1).cpu(), fd.double().reshape(1).cpu()


def _scheme(scheme: str) -> tuple[int, tuple[tuple[int, float], ...]]:
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(map(repr, _SCHEMES))}, got {scheme!r}")
    return _SCHEMES[scheme]


def _tensor_leaves(hparams: Any) -> tuple[Tensors, Tree]:
    leaves, structure = flatten(hparams, "hparams")
    if structure.modules:
        raise TypeError("hparams: finite differences need tensors, not an nn.Module; pass "
                        "dict(module.named_parameters()) and an inner_solve/outer_loss that take it")
    for i, t in enumerate(leaves):
        if not t.is_floating_point():
            raise TypeError(f"hparams[{i}]: expected a floating-point tensor, got {t.dtype}")
        if t.dtype != leaves[0].dtype or t.device != leaves[0].device:
            raise ValueError(f"hparams[{i}] is {t.dtype} on {t.device} but hparams[0] is "
                             f"{leaves[0].dtype} on {leaves[0].device}; use one dtype and device")
    return leaves, structure


def _warn_precision(dtype: torch.dtype) -> None:
    if dtype != torch.float64:
        warnings.warn(f"finite differences in {dtype} are noisy (rounding error ~ u/eps with "
                      f"u = {torch.finfo(dtype).eps:.1e}); use float64 hparams and inner solutions "
                      "for a reliable check", UserWarning, stacklevel=3)


def _direction_leaves(direction: Direction, hparams: Any, leaves: Tensors,
                      generator: torch.Generator | int | None) -> Tensors | None:
    if direction is None:
        return None
    if isinstance(direction, str):
        if direction != "random":
            raise ValueError(f"direction must be None, 'random' or a tensor structure like hparams, "
                             f"got {direction!r}")
        direction = random_direction(hparams, generator)
    steps, _ = flatten(_aligned(direction, hparams), "direction")
    if [s.shape for s in steps] != [t.shape for t in leaves]:
        raise ValueError(f"direction: expected tensors of shapes {[tuple(t.shape) for t in leaves]} "
                         f"(those of hparams), got {[tuple(s.shape) for s in steps]}")
    steps = tuple(s.detach().to(dtype=t.dtype, device=t.device) for s, t in zip(steps, leaves))
    if not any(bool(s.any()) for s in steps):
        raise ValueError("direction is zero; pass a nonzero direction")
    return steps


def _aligned(direction: Any, hparams: Any, path: str = "direction") -> Any:
    """``direction`` in the structure of ``hparams``, dict entries matched by key (not by
    position: a dict written in another key order is the same direction)."""
    if isinstance(hparams, dict):
        if not isinstance(direction, dict) or set(direction) != set(hparams):
            got = (f"keys {list(direction)}" if isinstance(direction, dict)
                   else f"a {type(direction).__name__}")
            raise ValueError(f"{path}: expected a dict with the keys of hparams, {list(hparams)}, got {got}")
        return {k: _aligned(direction[k], hparams[k], f"{path}[{k!r}]") for k in hparams}
    if isinstance(hparams, (tuple, list)):
        if not isinstance(direction, (tuple, list)) or len(direction) != len(hparams):
            got = (f"length {len(direction)}" if isinstance(direction, (tuple, list))
                   else f"a {type(direction).__name__}")
            raise ValueError(f"{path}: expected a tuple or list of {len(hparams)} entries, like hparams, "
                             f"got {got}")
        return [_aligned(d, h, f"{path}[{i}]") for i, (d, h) in enumerate(zip(direction, hparams))]
    return direction


def _finite_difference(inner_solve: Callable[[Any], Any], outer_loss: Callable[[Any, Any], Tensor],
                       leaves: Tensors, structure: Tree, eps: float | None, scheme: str,
                       direction: Tensors | None) -> Any:
    _, stencil = _scheme(scheme)
    eps = default_eps(leaves[0].dtype, scheme) if eps is None else eps
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    base = tuple(t.detach().clone() for t in leaves)
    cache: dict[int, float] = {}

    def response(shifted: Tensors) -> float:
        h = structure.unflatten(shifted)
        solved, solved_structure = flatten(inner_solve(h), "inner_solve(hparams)")
        params = solved_structure.unflatten([t.detach() for t in solved])
        with torch.no_grad():
            value = outer_loss(params, h)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("outer_loss must return a scalar tensor, got "
                             f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"outer_loss(inner_solve(hparams), hparams) is {number} at a perturbed "
                             f"hparams (finite-difference step {eps:g}); lower eps or check inner_solve")
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
                raise ValueError(f"eps={eps:g} is below the resolution of {b.dtype} at hparams "
                                 f"entry {float(x):g}; use a larger eps")

            def move(s: float, i: int = i, j: int = j, flat_b: Tensor = flat_b, b: Tensor = b) -> Tensors:
                shifted = flat_b.clone()
                shifted[j] += s
                return base[:i] + (shifted.reshape(b.shape),) + base[i + 1:]

            g[j] = derivative(move, h)
        grads.append(g.to(dtype=b.dtype, device=b.device).reshape(b.shape))
    return structure.unflatten(grads)


def _entry_names(structure: Tree, leaves: Tensors) -> list[str]:
    """Readable names of every scalar entry, e.g. ``hparams['a'][1, 2]``, in flat order."""
    names = []
    for path, t in zip(leaf_paths(structure, "hparams"), leaves):
        for j in range(t.numel()):
            index = [int(i) for i in torch.unravel_index(torch.tensor(j), t.shape)] if t.dim() else []
            names.append(f"{path}[{', '.join(map(str, index))}]" if index else path)
    return names


def _report(hg: HyperGradient, a: Tensor, b: Tensor, error: float, fd_norm: float, rtol: float, atol: float,
            scheme: str, eps: float, directional: bool, names: list[str], stationarity: float) -> str:
    relative = error / fd_norm if fd_norm > 0 else math.inf
    lines = [f"hypergradient of mode {hg.mode.name!r} does not match finite differences",
             f"  relative error ‖computed − fd‖/‖fd‖ = {relative:.3e} (allowed: atol {atol:g} + "
             f"rtol {rtol:g}·‖fd‖, i.e. ‖computed − fd‖ ≤ {atol + rtol * fd_norm:.3e}; got {error:.3e})"]
    if directional:
        lines.append(f"  along the given direction: computed {float(a[0]): .9e}, fd {float(b[0]): .9e}")
    else:
        norms = float(a.norm()) * fd_norm
        cosine = float(a @ b) / norms if norms > 0 else math.nan
        lines.append(f"  cosine similarity {cosine:.6f}; ‖computed‖ {float(a.norm()):.4e}, "
                     f"‖fd‖ {fd_norm:.4e}")
        lines.append("  worst entries:")
        width = max(len(n) for n in names)
        for i in torch.argsort((a - b).abs(), descending=True)[:5].tolist():
            lines.append(f"    {names[i]:<{width}}  computed {float(a[i]): .6e}  fd {float(b[i]): .6e}  "
                         f"diff {float(a[i] - b[i]): .2e}")
    lines.append(f"  finite differences: {scheme}, relative step eps={eps:.2e}")
    lines.append(f"  ‖∇θ inner_loss‖ at inner_solve(hparams): {stationarity:.2e} (implicit modes assume 0)")
    s = hg.stats
    lines.append(f"  mode stats: hvps={s.hvps}, iters={s.iters}, residual={s.residual}, "
                 f"converged={s.converged}, negative_curvature={s.negative_curvature}, "
                 f"diverged={s.diverged}, singular={s.singular}")
    return "\n".join(lines)
