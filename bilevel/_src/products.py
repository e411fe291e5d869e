"""Products with the Jacobian of the inner stationarity map ``G(θ, φ)`` (``∇θ f`` for a loss).

The graph of ``G`` is built once (``create_graph=True``) and every product reuses it
(reverse-over-reverse). Measured on CPU and an H100 (``../shared/MEASUREMENTS.md``): 2x to
8x faster per product than forward-over-reverse ``torch.func.jvp(torch.func.grad(f))``,
which rebuilds the first-order graph each time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import check_finite, second_order_guard
from .tree_math import flat, unflat
from .typing import Tensors


class StationarityJacobian:
    """``Jᵀx`` and ``(∂G/∂φ)ᵀx`` at one point, where ``J = ∂G/∂θ``.

    For a gradient field ``G = ∇θ f``, ``Jᵀ = H`` is the inner Hessian (symmetric) and
    ``(∂G/∂φ)ᵀ x = (∇²φθ f) x`` is the mixed product of the IFT formula.
    ``products`` counts the ``Jᵀx`` products (a batch of ``k`` counts ``k``).

    ``strict`` (default) refuses a θ that ``G`` does not depend on (a zero Hessian block, so
    a singular system); with ``strict=False`` such blocks are zero, as formulas that never
    solve the system exactly (AuxiLearn's Neumann series) expect. Entries of ``field`` that
    are None or constant count as zero. ``suspects`` is the clause that error names as the
    likely cause (custom autograd Functions), or a callable that makes it when needed.
    """

    def __init__(self, field: Sequence[Tensor | None], theta: Tensors, phi: Tensors,
                 suspects: str | Callable[[], str] = "", strict: bool = True) -> None:
        self.theta, self.phi = theta, phi
        self._live = [i for i, g in enumerate(field) if g is not None and g.grad_fn is not None]
        self.field = tuple(field[i] for i in self._live)
        self.suspects = suspects
        self.strict = strict
        self.products = 0
        self.unused: tuple[bool, ...] = ()
        self.batched = theta[0].device.type == "cuda"

    def _vjp(self, x: Tensors, wrt: Tensors, what: str, batched: bool = False) -> Tensors:
        if self.field:
            with second_order_guard(what):
                grads = torch.autograd.grad(self.field, wrt, grad_outputs=[x[i] for i in self._live],
                                            retain_graph=True, allow_unused=True, is_grads_batched=batched)
        else:
            grads = (None,) * len(wrt)
        batch = (x[0].shape[0],) if batched else ()
        self.unused = tuple(g is None for g in grads)
        if self.strict and wrt is self.theta and any(self.unused):
            i = self.unused.index(True)
            suspects = self.suspects() if callable(self.suspects) else self.suspects
            where = f"params[{i}]" if len(wrt) > 1 else "params"
            raise ValueError(
                f"the gradient of inner_loss does not depend on {where}, so the inner Hessian has a "
                "zero block and the implicit system is singular: inner_loss is linear in it, or an "
                f"op without double backward cut the graph{suspects}. Replace that op by a "
                "twice-differentiable one, or leave the tensor out of params")
        return tuple(torch.zeros(batch + w.shape, dtype=w.dtype, device=w.device) if g is None else g
                     for g, w in zip(grads, wrt))

    def matvec(self, x: Tensors) -> Tensors:
        """``Jᵀ x`` (``H x`` for a gradient field)."""
        self.products += 1
        return self._vjp(x, self.theta, "a Hessian-vector product")

    def matmat(self, rows: Tensor) -> Tensor:
        """``Jᵀ`` applied to each row of a ``(k, P)`` batch of flat vectors, as ``(k, P)``.

        One batched pass (``is_grads_batched``) on CUDA, where it is several times faster
        for small models (MEASUREMENTS.md); a loop on CPU, where batching is slower. Falls
        back to the loop when an op cannot be batched.
        """
        k = rows.shape[0]
        if self.batched:
            try:
                out = self._vjp(unflat(rows, self.theta), self.theta, "a batch of Hessian-vector products",
                                batched=True)
                self.products += k
                return torch.cat([o.reshape(k, -1) for o in out], dim=1)
            except RuntimeError:
                self.batched = False
        return torch.stack([flat(self.matvec(unflat(row, self.theta))) for row in rows])

    def mixed(self, x: Tensors) -> Tensors:
        """``(∂G/∂φ)ᵀ x``, zeros for hparams that the stationarity map does not depend on
        (``unused`` then flags them)."""
        out = self._vjp(x, self.phi, "the mixed second-derivative product ∇²φθ f · x")
        check_finite(out, "the mixed second-derivative product ∇²φθ f · x")
        return out
