"""The one product operator: ``Jᵀx`` and ``(∂G/∂φ)ᵀx`` for the inner stationarity map ``G``.

Every Hessian (or transposed-Jacobian) product and every mixed product of every implicit
mode goes through :class:`StationarityJacobian`; how a product is differentiated is the
``pullback`` it is given. Eagerly that is one reverse pass through the graph of ``G``, built
once with ``create_graph=True`` and reused by every product (reverse-over-reverse), which is
faster per product than forward-over-reverse, which rebuilds the first-order graph each time
(benchmarks/README.md); in compiled code it is the pullback of ``torch.func.vjp`` of ``G``.
Without second derivatives (``hvp="finite-difference"``) a product is a central difference
of first-order gradients, :meth:`StationarityJacobian.from_differences`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import torch
from torch import Tensor

from .errors import check_finite, second_order_guard
from .tree_math import axpy, dot, flat, norm, scale, unflat
from .typing import Tensors

__all__ = ["HVP_RULES", "Gradient", "ProductRule", "Pullback", "StationarityJacobian"]

Wrt = Literal["theta", "phi"]
HVP_RULES = ("autograd", "finite-difference")

#: ``(θ', wrt) ↦ ∇θ f(θ', φ)`` or ``∇φ f(θ', φ)``: first-order gradients of the inner loss at
#: a point θ' (φ fixed), None for an input ``f`` does not depend on
Gradient = Callable[[Tensors, Wrt], Sequence[Tensor | None]]


@dataclass(frozen=True)
class ProductRule:
    """How an implicit mode differentiates its products (the ``hvp`` and ``fd_eps`` options).

    ``"autograd"``: through the graph of ``G`` (second derivatives). ``"finite-difference"``:
    central differences of first-order gradients of the inner loss, for models whose ops have
    no double backward; ``fd_eps`` is the relative step ``c`` of
    :meth:`StationarityJacobian.from_differences` (default ``∛(machine ε)`` of the dtype).
    """

    hvp: str = "autograd"
    fd_eps: float | None = None

    def __post_init__(self) -> None:
        if self.hvp not in HVP_RULES:
            raise ValueError(f"option hvp must be one of {', '.join(map(repr, HVP_RULES))}, got {self.hvp!r}")
        if self.fd_eps is None:
            return
        if not self.first_order:
            raise ValueError(
                "option fd_eps sets the step of hvp='finite-difference'; pass that too, or drop fd_eps"
            )
        if (
            isinstance(self.fd_eps, bool)
            or not isinstance(self.fd_eps, (int, float))
            or not 0 < self.fd_eps < 1
        ):
            raise ValueError(f"option fd_eps must be a number in (0, 1), got {self.fd_eps!r}")

    @property
    def first_order(self) -> bool:
        return self.hvp == "finite-difference"

    def relative_step(self, dtype: torch.dtype) -> float:
        """``c``: ``fd_eps``, or ``∛ε`` of ``dtype``, which balances the central difference's
        truncation error (∝ c²) against the rounding of the two gradients (∝ ε/c)."""
        return float(self.fd_eps) if self.fd_eps is not None else float(torch.finfo(dtype).eps) ** (1 / 3)


class Pullback(Protocol):
    """``x ↦ (∂G/∂θ)ᵀx`` or ``(∂G/∂φ)ᵀx`` (``wrt``), None for an input ``G`` does not depend
    on; ``batched``: ``x`` holds a leading batch dimension (``is_grads_batched``)."""

    def __call__(self, x: Tensors, wrt: Wrt, batched: bool) -> Sequence[Tensor | None]: ...


class StationarityJacobian:
    """``Jᵀx`` and ``(∂G/∂φ)ᵀx`` at one point, where ``J = ∂G/∂θ``.

    For a gradient field ``G = ∇θ f``, ``Jᵀ = H`` is the inner Hessian (symmetric) and
    ``(∂G/∂φ)ᵀ x = (∇²φθ f) x`` is the mixed product of the IFT formula.
    ``products`` counts the ``Jᵀx`` products (a batch of ``k`` counts ``k``).

    ``strict`` (default) refuses a θ that ``G`` does not depend on (a zero Hessian block, so
    a singular system); with ``strict=False`` such blocks are zero, as formulas that never
    solve the system exactly (AuxiLearn's Neumann series) expect. ``suspects`` is the clause
    that error names as the likely cause (custom autograd Functions), or a callable that
    makes it when needed. ``checked``: translate missing double backwards and check the
    mixed product for NaN (eager code; compiled code checks after the call).

    Build it with :meth:`from_field` (eager autograd) or :meth:`from_vjp` (``torch.func``).
    """

    def __init__(
        self,
        pullback: Pullback,
        theta: Tensors,
        phi: Tensors,
        suspects: str | Callable[[], str] = "",
        strict: bool = True,
        checked: bool = True,
        batched: bool = False,
    ) -> None:
        self.pullback = pullback
        self.theta, self.phi = theta, phi
        self.suspects = suspects
        self.strict = strict
        self.checked = checked
        self.batched = batched
        self.products = 0
        self.unused: tuple[bool, ...] = ()
        #: first-order gradient evaluations made by the products (finite differences only)
        self.evaluations = 0
        self.first_order = False

    @classmethod
    def from_field(
        cls,
        field: Sequence[Tensor | None],
        theta: Tensors,
        phi: Tensors,
        suspects: str | Callable[[], str] = "",
        strict: bool = True,
    ) -> StationarityJacobian:
        """The operator of ``G`` given as tensors with their graph (``create_graph=True``).
        Entries of ``field`` that are None or constant count as zero."""
        live = [i for i, g in enumerate(field) if g is not None and g.grad_fn is not None]
        outputs = tuple(cast(Tensor, field[i]) for i in live)

        def pullback(x: Tensors, wrt: Wrt, batched: bool) -> Sequence[Tensor | None]:
            inputs = theta if wrt == "theta" else phi
            if not outputs:
                return (None,) * len(inputs)
            return torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs=[x[i] for i in live],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )

        # batched products: one pass on CUDA, where it is several times faster for small
        # models; a loop on the CPU, where batching is slower (benchmarks/README.md)
        return cls(
            pullback, theta, phi, suspects, strict, checked=True, batched=theta[0].device.type == "cuda"
        )

    @classmethod
    def from_vjp(
        cls, vjp: Callable[[Tensors], tuple[Tensors, Tensors]], theta: Tensors, phi: Tensors
    ) -> StationarityJacobian:
        """The operator of the pullback of ``torch.func.vjp(G, θ, φ)``, for traced code."""

        def pullback(x: Tensors, wrt: Wrt, batched: bool) -> Sequence[Tensor | None]:
            return vjp(x)[0 if wrt == "theta" else 1]

        return cls(pullback, theta, phi, checked=False)

    @classmethod
    def from_differences(
        cls,
        gradient: Gradient,
        theta: Tensors,
        phi: Tensors,
        relative_step: float,
        suspects: str | Callable[[], str] = "",
    ) -> StationarityJacobian:
        """The operator of ``G = ∇θ f`` from first-order gradients only: for a vector ``x``,

            H x ≈ [∇θ f(θ + hx, φ) − ∇θ f(θ − hx, φ)] / 2h,
            (∇²φθ f) x ≈ [∇φ f(θ + hx, φ) − ∇φ f(θ − hx, φ)] / 2h,

        two gradient evaluations per product (``evaluations``), no second derivative anywhere.
        The difference is taken along the unit vector ``u = x/‖x‖`` and scaled by ``‖x‖``, with
        a displacement of norm ``‖hx‖ = c·(1 + Σᵢ|θᵢ||uᵢ|)``, ``c = relative_step``: the rounding
        of θ + hx itself, projected on u, is about ε·Σᵢ|θᵢ||uᵢ|, so the step stays well above it
        (a large-valued tensor elsewhere in θ does not inflate the step along the others), and
        ``c = ∛ε`` balances the truncation error, O(‖hx‖²) in the third derivative, against the
        rounding of the two gradients, O(ε‖∇f‖/‖hx‖). Exact up to rounding for
        quadratic losses. Valid only where ``G`` is a gradient: a difference of ``G`` gives
        ``J x``, which is ``Jᵀx`` only for a symmetric ``J``.

        ``gradient``, ``h`` and the products are tensor computations (no host read), so the
        same operator serves the eager and the compiled paths.
        """
        center = tuple(t.detach() for t in theta)  # the products are values, not graphs
        magnitude = tuple(t.abs() for t in center)
        tiny = float(torch.finfo(center[0].dtype).tiny)

        def pullback(x: Tensors, wrt: Wrt, batched: bool) -> Sequence[Tensor | None]:
            # difference along the unit vector and scale back (the product is linear in x):
            # the step does not depend on the size of x; x = 0 gives zeros
            direction, size = _unit(x, tiny)
            displacement = relative_step * (1.0 + dot(magnitude, tuple(d.abs() for d in direction)))
            plus = gradient(axpy(displacement, direction, center), wrt)
            minus = gradient(axpy(-displacement, direction, center), wrt)
            operator.evaluations += 2
            factor = size / (2 * displacement)
            return tuple(None if a is None or b is None else (a - b) * factor for a, b in zip(plus, minus))

        operator = cls(pullback, theta, phi, suspects, checked=True)
        operator.first_order = True
        return operator

    def _pull(self, x: Tensors, wrt: Wrt, what: str, batched: bool = False) -> Tensors:
        inputs = self.theta if wrt == "theta" else self.phi
        if self.checked and not self.first_order:
            with second_order_guard(what):
                grads = self.pullback(x, wrt, batched)
        else:
            grads = self.pullback(x, wrt, batched)
        self.unused = tuple(g is None for g in grads)
        if self.strict and wrt == "theta" and any(self.unused):
            self._refuse_unused()
        batch = (x[0].shape[0],) if batched else ()
        return tuple(
            torch.zeros(batch + w.shape, dtype=w.dtype, device=w.device) if g is None else g
            for g, w in zip(grads, inputs)
        )

    def _refuse_unused(self) -> None:
        i = self.unused.index(True)
        suspects = self.suspects() if callable(self.suspects) else self.suspects
        where = f"params[{i}]" if len(self.theta) > 1 else "params"
        if self.first_order:  # a first-order gradient is None only where f ignores the tensor
            raise ValueError(
                f"inner_loss does not depend on {where}, so the inner Hessian has a zero block and "
                "the implicit system is singular; leave the tensor out of params, or make sure "
                "inner_loss uses the params it receives"
            )
        raise ValueError(
            f"the gradient of inner_loss does not depend on {where}, so the inner Hessian has a "
            "zero block and the implicit system is singular: inner_loss is linear in it, or an "
            f"op without double backward cut the graph{suspects}. Replace that op by a "
            "twice-differentiable one, or leave the tensor out of params"
        )

    def matvec(self, x: Tensors) -> Tensors:
        """``Jᵀ x`` (``H x`` for a gradient field)."""
        self.products += 1
        return self._pull(x, "theta", "a Hessian-vector product")

    def matmat(self, rows: Tensor) -> Tensor:
        """``Jᵀ`` applied to each row of a ``(k, P)`` batch of flat vectors, as ``(k, P)``:
        one batched pass where that is faster (CUDA), else a loop; falls back to the loop
        when an op cannot be batched."""
        k = rows.shape[0]
        if self.batched:
            try:
                out = self._pull(
                    unflat(rows, self.theta), "theta", "a batch of Hessian-vector products", batched=True
                )
                self.products += k
                return torch.cat([o.reshape(k, -1) for o in out], dim=1)
            except RuntimeError:
                self.batched = False
        return torch.stack([flat(self.matvec(unflat(row, self.theta))) for row in rows])

    def mixed(self, x: Tensors) -> Tensors:
        """``(∂G/∂φ)ᵀ x``, zeros for hparams that the stationarity map does not depend on
        (``unused`` then flags them)."""
        out = self._pull(x, "phi", "the mixed second-derivative product ∇²φθ f · x")
        if self.checked:
            check_finite(out, "the mixed second-derivative product ∇²φθ f · x")
        return out


def _unit(x: Tensors, tiny: float) -> tuple[Tensors, Tensor]:
    """``(x/‖x‖, ‖x‖)``, scaled by ``max|x|`` first so that the norm of a tiny vector does not
    underflow (its squares would); for ``x = 0`` a zero direction (so a zero product)."""
    peak = torch.stack([t.abs().amax() for t in x]).amax().clamp_min(tiny)
    scaled = scale(1.0 / peak, x)
    length = norm(scaled).clamp_min(1.0)  # ≥ 1 unless x = 0: one entry of `scaled` is ±1
    return scale(1.0 / length, scaled), peak * length
