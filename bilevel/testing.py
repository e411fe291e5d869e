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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._src.conditions import Condition, FixedPoint, Root, residual_map
from ._src.finite_differences import (
    Direction,
    default_eps,
    direction_leaves,
    finite_difference,
    finite_difference_hypergradient,
    random_direction,
    tensor_leaves,
    warn_precision,
)
from ._src.hypergradient import HyperGradient
from ._src.pytree import Tree, flatten, leaf_paths
from ._src.typing import Tensors

__all__ = ["assert_hypergradient_close", "default_eps", "finite_difference_hypergradient", "random_direction"]

# default (rtol, atol) of assert_hypergradient_close: float64, and anything less precise
_TOLERANCES = {torch.float64: (1e-5, 1e-8)}
_LOW_PRECISION_TOLERANCES = (1e-2, 1e-4)


def assert_hypergradient_close(
    hg_or_mode: HyperGradient | str,
    inner_loss: Callable[[Any, Any], Tensor] | Condition,
    outer_loss: Callable[[Any, Any], Tensor],
    inner_solve: Callable[[Any], Any],
    hparams: Any,
    rtol: float | None = None,
    atol: float | None = None,
    eps: float | None = None,
    scheme: str = "central",
    direction: Direction = None,
    generator: torch.Generator | int | None = None,
) -> tuple[Any, Any]:
    """Assert that a mode's hypergradient at ``θ*(φ) = inner_solve(φ)`` matches finite differences.

    ``inner_loss`` may also be a :class:`~bilevel.Root` or :class:`~bilevel.FixedPoint`
    (then ``inner_solve`` solves ``F = 0`` or ``θ = T(θ, φ)``).

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
    leaves, structure = tensor_leaves(hparams)
    dtype = leaves[0].dtype
    warn_precision(dtype)
    default_rtol, default_atol = _TOLERANCES.get(dtype, _LOW_PRECISION_TOLERANCES)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    step_dir = direction_leaves(direction, hparams, leaves, generator)

    # the user's hparams where they require grad (options such as lr=that_tensor refer to them;
    # compute() never modifies them), detached views that do otherwise
    phi = structure.unflatten([t if t.requires_grad else t.detach().requires_grad_() for t in leaves])
    returned = inner_solve(structure.unflatten([t.detach().clone() for t in leaves]))
    solved, solved_structure = flatten(returned, "inner_solve(hparams)")
    if solved_structure.modules:  # a module is evaluated at its own (solved) parameters
        params, params_leaves = returned, solved
    else:
        params_leaves = tuple(t.detach().clone().requires_grad_() for t in solved)
        params = solved_structure.unflatten(params_leaves)
    computed = hg.compute(inner_loss, outer_loss, params, phi)
    fd = finite_difference(inner_solve, outer_loss, leaves, structure, eps, scheme, step_dir)

    a, b = _compared(computed, fd, step_dir)
    error, fd_norm = float((a - b).norm()), float(b.norm())
    if error <= atol + rtol * fd_norm:
        return computed, fd
    step = default_eps(dtype, scheme) if eps is None else eps
    residual, label = _residual(inner_loss, params, phi, params_leaves)
    raise AssertionError(
        _report(
            hg,
            a,
            b,
            error,
            fd_norm,
            rtol,
            atol,
            scheme,
            step,
            step_dir is not None,
            _entry_names(structure, leaves),
            residual,
            label,
        )
    )


# ------------------------------------------------------------------------------ internals
def _hypergradient(hg_or_mode: HyperGradient | str) -> HyperGradient:
    if isinstance(hg_or_mode, str):
        return HyperGradient(hg_or_mode)
    if isinstance(hg_or_mode, HyperGradient):
        return hg_or_mode
    raise TypeError(
        "hg_or_mode: expected a HyperGradient or a mode name such as 'implicit-cg', "
        f"got {type(hg_or_mode).__name__}"
    )


def _residual(inner: Any, params: Any, phi: Any, leaves: Tensors) -> tuple[float, str]:
    """How far ``params`` is from the inner solution, and what that number measures: the
    norm of ``∇θ inner_loss``, of ``F`` for a ``Root(F)``, of ``θ − T(θ, φ)`` for a ``FixedPoint(T)``."""
    with torch.enable_grad():
        if isinstance(inner, (Root, FixedPoint)):
            label = "‖F(params, hparams)‖" if isinstance(inner, Root) else "‖params − T(params, hparams)‖"
            grads: Any = residual_map(inner)(params, phi)
        else:
            label = "‖∇θ inner_loss‖"
            grads = torch.autograd.grad(inner(params, phi), leaves, allow_unused=True)
    return math.sqrt(sum(float((g.detach() * g.detach()).sum()) for g in grads if g is not None)), label


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


def _entry_names(structure: Tree, leaves: Tensors) -> list[str]:
    """Readable names of every scalar entry, e.g. ``hparams['a'][1, 2]``, in flat order."""
    names = []
    for path, t in zip(leaf_paths(structure, "hparams"), leaves):
        for j in range(t.numel()):
            index = [int(i) for i in torch.unravel_index(torch.tensor(j), t.shape)] if t.dim() else []
            names.append(f"{path}[{', '.join(map(str, index))}]" if index else path)
    return names


def _report(
    hg: HyperGradient,
    a: Tensor,
    b: Tensor,
    error: float,
    fd_norm: float,
    rtol: float,
    atol: float,
    scheme: str,
    eps: float,
    directional: bool,
    names: list[str],
    stationarity: float,
    label: str,
) -> str:
    relative = error / fd_norm if fd_norm > 0 else math.inf
    lines = [
        f"hypergradient of mode {hg.mode.name!r} does not match finite differences",
        f"  relative error ‖computed − fd‖/‖fd‖ = {relative:.3e} (allowed: atol {atol:g} + "
        f"rtol {rtol:g}·‖fd‖, i.e. ‖computed − fd‖ ≤ {atol + rtol * fd_norm:.3e}; got {error:.3e})",
    ]
    if directional:
        lines.append(f"  along the given direction: computed {float(a[0]): .9e}, fd {float(b[0]): .9e}")
    else:
        norms = float(a.norm()) * fd_norm
        cosine = float(a @ b) / norms if norms > 0 else math.nan
        lines.append(
            f"  cosine similarity {cosine:.6f}; ‖computed‖ {float(a.norm()):.4e}, ‖fd‖ {fd_norm:.4e}"
        )
        lines.append("  worst entries:")
        width = max(len(n) for n in names)
        for i in torch.argsort((a - b).abs(), descending=True)[:5].tolist():
            lines.append(
                f"    {names[i]:<{width}}  computed {float(a[i]): .6e}  fd {float(b[i]): .6e}  "
                f"diff {float(a[i] - b[i]): .2e}"
            )
    lines.append(f"  finite differences: {scheme}, relative step eps={eps:.2e}")
    lines.append(f"  {label} at inner_solve(hparams): {stationarity:.2e} (implicit modes assume 0)")
    s = hg.stats
    lines.append(
        f"  mode stats: hvps={s.hvps}, iters={s.iters}, residual={s.residual}, "
        f"converged={s.converged}, negative_curvature={s.negative_curvature}, "
        f"diverged={s.diverged}, singular={s.singular}"
    )
    return "\n".join(lines)
