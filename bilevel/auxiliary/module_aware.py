"""Module-aware auxiliary weighting (MAOAL): one weight per (auxiliary loss, module) pair.

Lower level: the update direction of shared module ``m`` is
``G_m = ∇_m L_main + Σ_a w[a, m] ∇_m L_a``, written into ``.grad`` before the optimizer step;
other parameters (task heads) get ``∇(L_main + Σ_a L_a)``. ``G`` is not the gradient of one
scalar, so the upper level differentiates the fixed point ``G(θ, φ) = 0`` with the transposed
Jacobian: ``dg/dφ = −(∂G/∂φ)ᵀ x`` with ``Jᵀ x = ∂g/∂θ``, ``J = ∂G/∂θ``. Modes that handle
non-symmetric systems: implicit-neumann, implicit-gmres, implicit-exact, implicit-identity;
the others refuse (unrolled modes: a root states no iteration to unroll).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .._src.conditions import ConditionProblem, Root
from .._src.errors import check_finite, second_order_guard
from .._src.hypergradient import HyperGradient
from .._src.typing import Tensors

__all__ = ["ModuleAwareProblem", "ModuleAwareWeights", "module_groups"]

TaskLosses = Callable[[nn.Module], Tensor]  # model -> (1 + A,) losses: main first, then auxiliaries


def module_groups(model: nn.Module, by: str = "child", exclude: Iterable[str] = ()) -> dict[str, list[str]]:
    """Group the trainable parameters of ``model`` into modules for per-module weights.

    ``by="child"``: one group per top-level child (``"0"``, ``"encoder"``, ...); ``by="tensor"``:
    one group per parameter tensor. Parameters whose names start with a prefix in ``exclude``
    (task heads) are left out: they are not shared.
    """
    if by not in ("child", "tensor"):
        raise ValueError(f"by must be 'child' or 'tensor', got {by!r}")
    exclude = tuple(exclude)
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (exclude and name.startswith(exclude)):
            continue
        groups.setdefault(name.split(".")[0] if by == "child" else name, []).append(name)
    if not groups:
        raise ValueError("no shared parameters left to weight; check exclude")
    return groups


def _check_groups(groups: dict[str, list[str]]) -> None:
    """Each module non-empty and each parameter in one module only (else its weight is ambiguous)."""
    if not groups:
        raise ValueError("groups must name at least one module: {module name: [parameter names]}")
    owner: dict[str, str] = {}
    for module, names in groups.items():
        if isinstance(names, str) or not list(names):
            raise ValueError(f"groups[{module!r}] must be a non-empty list of parameter names, got {names!r}")
        for name in names:
            if name in owner:
                raise ValueError(
                    f"parameter {name!r} is in two modules, {owner[name]!r} and {module!r}; "
                    "put each parameter in one group"
                )
            owner[name] = module


class ModuleAwareWeights(nn.Module):
    """Weights ``w[a, m] = scale · relu(raw[a, m]) ≥ 0``, raw initialised to ``init`` (1) and
    ``scale`` to 1/A, for A auxiliary losses and the modules in ``groups`` (name -> parameter
    names of the model, e.g. from :func:`module_groups`)."""

    def __init__(
        self, num_aux: int, groups: dict[str, list[str]], init: float = 1.0, scale: float | None = None
    ) -> None:
        super().__init__()
        if num_aux < 1:
            raise ValueError(f"num_aux must be >= 1, got {num_aux}")
        _check_groups(groups)
        self.num_aux = num_aux
        self.groups = {k: list(v) for k, v in groups.items()}
        self.scale = 1.0 / num_aux if scale is None else scale
        self.raw = nn.Parameter(torch.full((num_aux, len(groups)), float(init)))

    @classmethod
    def from_model(
        cls, model: nn.Module, num_aux: int, by: str = "child", exclude: Iterable[str] = (), **kwargs
    ) -> ModuleAwareWeights:
        return cls(num_aux, module_groups(model, by, exclude), **kwargs)

    def weights(self, raw: Tensor | None = None) -> Tensor:
        """The (A, M) weight matrix (from ``raw`` if given, for differentiable evaluation)."""
        return self.scale * torch.relu(self.raw if raw is None else raw)

    def coefficients(self, names: list[str], raw: Tensor | None = None) -> list[Tensor | None]:
        """Per parameter name: its (A,) auxiliary weights, or None for unshared parameters."""
        weights = self.weights(raw)
        column = {n: j for j, members in enumerate(self.groups.values()) for n in members}
        unknown = sorted(set(column) - set(names))
        if unknown:
            raise ValueError(
                f"groups name parameters the model does not have (or that do not require "
                f"grad): {', '.join(unknown)}; its parameters are: {', '.join(names)}"
            )
        return [weights[:, column[n]] if n in column else None for n in names]

    def field(
        self,
        names: list[str],
        params: Tensors,
        losses: Tensor,
        raw: Tensor | None = None,
        create_graph: bool = False,
    ) -> Tensors:
        """``G`` for each parameter from the (1 + A,) task losses evaluated at ``params``."""
        if losses.shape != (1 + self.num_aux,):
            raise ValueError(
                f"task losses must have shape ({1 + self.num_aux},): the main loss, then "
                f"{self.num_aux} auxiliary losses; got {tuple(losses.shape)}"
            )
        per_task = [
            torch.autograd.grad(loss, params, create_graph=create_graph, retain_graph=True, allow_unused=True)
            for loss in losses
        ]
        out = []
        for i, (p, coef) in enumerate(zip(params, self.coefficients(names, raw))):
            grads = [torch.zeros_like(p) if g[i] is None else g[i] for g in per_task]
            weights = (
                torch.ones(self.num_aux, dtype=p.dtype, device=p.device) if coef is None else coef.to(p.dtype)
            )
            out.append(grads[0] + sum(w * g for w, g in zip(weights, grads[1:])))
        return tuple(out)

    def write_gradients(self, model: nn.Module, losses: Tensor) -> None:
        """The lower-level step: write ``G`` into the model's ``.grad`` (then call the
        optimizer's ``step``). ``losses`` is the (1 + A,) vector computed with the model."""
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        with torch.no_grad():
            weights_raw = self.raw.detach()
        grads = self.field(list(names), params, losses, raw=weights_raw)
        for p, g in zip(params, grads):
            p.grad = g.detach()

    def backward(
        self,
        hypergradient: HyperGradient,
        model: nn.Module,
        task_losses: TaskLosses,
        dev_loss: Callable[[nn.Module], Tensor],
    ) -> None:
        """The upper-level step: accumulate the implicit hypergradient of ``dev_loss`` through
        the fixed point ``G = 0`` into ``self.raw.grad``. ``task_losses(model)`` returns the
        (1 + A,) losses on a training batch."""
        problem = ModuleAwareProblem(model, self, task_losses, dev_loss)
        (grad,) = hypergradient.solve(problem)
        self.raw.grad = grad.clone() if self.raw.grad is None else self.raw.grad + grad


class ModuleAwareProblem(ConditionProblem):
    """The bilevel problem of module-aware weighting: params = the model, hparams = the
    weights, outer loss ``dev_loss(model)``, and the inner solution stated by the public
    :class:`~bilevel.Root`: ``G = 0`` (a non-symmetric Jacobian), with ``G`` the
    module-weighted gradient of the task losses."""

    def __init__(
        self,
        model: nn.Module,
        weights: ModuleAwareWeights,
        task_losses: TaskLosses,
        dev_loss: Callable[[nn.Module], Tensor],
    ) -> None:
        def field(model: nn.Module, weights: ModuleAwareWeights) -> Tensors:
            # called with both modules bound to the point of evaluation (θ, φ)
            names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
            losses = task_losses(model)
            check_finite((losses,), "the task losses")
            with second_order_guard("the per-task gradients of the task losses"):
                out = weights.field(list(names), params, losses, raw=weights.raw, create_graph=True)
            check_finite(out, "the module-weighted gradient G")
            return out

        super().__init__(Root(field), lambda m, w: dev_loss(m), model, weights)
        self.weights_module = weights
