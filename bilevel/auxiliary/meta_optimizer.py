"""A drop-in for AuxiLearn's ``MetaOptimizer``, with its failures fixed and any implicit mode available."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._src.errors import check_finite, second_order_guard
from .._src.graph import custom_functions, reached, warn_once_differentiable
from .._src.hypergradient import HyperGradient
from .._src.problem import BilevelProblem
from .._src.products import StationarityJacobian
from .._src.solvers import neumann
from .._src.typing import Tensors
from ..modes._unrolled import UnrolledMode
from ..modes.base import ImplicitMode, Mode
from ..modes.penalty import Penalty

__all__ = ["MetaOptimizer"]


class MetaOptimizer:
    """Update auxiliary parameters with hypergradients of a validation (main-task) loss.

    Drop-in for AuxiLearn's class: same constructor and ``step`` arguments, in the same order.

    **Default (``mode=None``): AuxiLearn's hypergradient, number for number.**
    ``−(∇²φθ f) p`` with ``p = Σ_{j=0..K} (I − αH)ʲ ∂g/∂θ``, ``α = hpo_lr``,
    ``K = truncate_iter`` (K+1 terms from K Hessian-vector products), ``p`` *not* multiplied
    by α and the direct term ∂g/∂φ left out. For small α, ``p ≈ (K+1)·∂g/∂θ``: an
    identity-Hessian approximation scaled by K+1 rather than the IFT hypergradient
    ``∂g/∂φ − (∇²φθ f) H⁻¹ ∂g/∂θ``. AuxiLearn users' meta learning rates are tuned to that
    scale, so swapping the import keeps their training dynamics.

    **The true hypergradient:** pass an implicit mode, e.g. ``mode="implicit-cg"`` (its
    options as keywords, ``iters=20``), or ``"implicit-exact"`` for tiny models. This
    includes the direct term and solves ``H x = ∂g/∂θ`` properly; the meta learning rate
    then usually needs retuning: where H ≈ I/α the result is α times the default's (then
    ``p = ∂g/∂θ``), and for small α, where ``p ≈ (K+1)·∂g/∂θ``, about ``H⁻¹/(K+1)`` times it.
    ``hpo_lr`` and ``truncate_iter`` are unused then. Unrolled modes need loss
    *functions*, not loss tensors: use :class:`~bilevel.auxiliary.AuxiliaryLearner`.

    Fixed failures of the original: ``parameters``/``aux_params`` may be generators (read
    once); tensors that do not require grad are skipped; parameters a loss does not use get
    zero (not a crash on None); an op without double backward raises
    :class:`~bilevel.NoDoubleBackwardError` naming it; a training gradient that reaches no
    auxiliary parameter (a cut graph, a hypergradient that would be identically zero) raises.

    Args:
        meta_optimizer: a torch optimizer over the auxiliary parameters.
        hpo_lr: α, the step of the Neumann series (default mode).
        truncate_iter: K, the number of Hessian-vector products (default mode).
        max_grad_norm: clip the auxiliary gradients to this total norm before the step
            (None: no clipping).
        mode: None for AuxiLearn's formula, or a registered implicit mode name.
        **mode_options: options of that mode.
    """

    def __init__(
        self,
        meta_optimizer: torch.optim.Optimizer,
        hpo_lr: float,
        truncate_iter: int = 3,
        max_grad_norm: float | None = 10,
        mode: str | None = None,
        **mode_options: Any,
    ) -> None:
        if not isinstance(meta_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"meta_optimizer must be a torch.optim.Optimizer over the auxiliary "
                f"parameters, got {type(meta_optimizer).__name__}"
            )
        if isinstance(hpo_lr, bool) or not isinstance(hpo_lr, (int, float)) or hpo_lr <= 0:
            raise ValueError(f"hpo_lr must be a number > 0, got {hpo_lr!r}")
        if isinstance(truncate_iter, bool) or not isinstance(truncate_iter, int) or truncate_iter < 0:
            raise ValueError(f"truncate_iter must be an int >= 0, got {truncate_iter!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")
        if mode is None and mode_options:
            raise TypeError(
                f"options {sorted(mode_options)} need a mode; AuxiLearn's formula "
                "(mode=None) takes only hpo_lr and truncate_iter"
            )
        self.meta_optimizer = meta_optimizer
        self.hpo_lr = hpo_lr
        self.truncate_iter = truncate_iter
        self.max_grad_norm = max_grad_norm
        self._screened = False
        self.hypergradient = None if mode is None else HyperGradient(mode, **mode_options)
        if self.hypergradient is not None:
            _check_evaluates_only_here(self.hypergradient.mode)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the auxiliary parameters' gradients (the wrapped optimizer's ``zero_grad``)."""
        self.meta_optimizer.zero_grad(set_to_none=set_to_none)

    def step(
        self,
        train_loss: Tensor,
        val_loss: Tensor,
        parameters: Iterable[Tensor],
        aux_params: Iterable[Tensor],
        return_grads: bool = False,
    ) -> list[Tensor] | None:
        """Compute the hypergradient of ``val_loss`` w.r.t. ``aux_params`` through the inner
        problem of ``train_loss`` over ``parameters``, zero the meta optimizer, write the
        hypergradient into the auxiliary ``.grad``, clip it, and take a meta-optimizer step.

        ``train_loss`` and ``val_loss`` are scalar tensors computed at the current parameters
        (with their graphs). The primary parameters' ``.grad`` is never touched. Returns, if
        ``return_grads``, the gradients as written into ``.grad`` (after clipping), one per
        auxiliary parameter that requires grad.
        """
        theta, positions = _trainable(parameters, "parameters")
        phi, _ = _trainable(aux_params, "aux_params")
        for name, loss in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(
                    f"{name} must be a scalar tensor with a graph to the parameters "
                    "(compute it with the models, without torch.no_grad, and reduce it)"
                )
        if not self._screened:  # the graph walks, on the first step only
            _check_roles(val_loss, theta)
            self._screened = True
            warn_once_differentiable(train_loss)
        if self.hypergradient is None:
            grads = self._auxilearn(train_loss.reshape(()), val_loss.reshape(()), theta, phi)
        else:
            grads = self._implicit_once(train_loss.reshape(()), val_loss.reshape(()), theta, phi, positions)
        self.meta_optimizer.zero_grad()
        for p, g in zip(phi, grads):
            p.grad = g.detach().to(p.dtype).clone()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(phi, self.max_grad_norm)
        self.meta_optimizer.step()
        return [p.grad.clone() for p in phi if p.grad is not None] if return_grads else None

    def _auxilearn(self, train_loss: Tensor, val_loss: Tensor, theta: Tensors, phi: Tensors) -> Tensors:
        """AuxiLearn's formula: K products with H, K+1 terms, no α factor, no direct term."""
        with second_order_guard("the gradient of train_loss"):
            field = torch.autograd.grad(train_loss, theta, create_graph=True, allow_unused=True)
        # retain_graph: val_loss may share a forward pass with train_loss, whose graph is still needed
        v = torch.autograd.grad(val_loss, theta, allow_unused=True, retain_graph=True)
        v = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(v, theta))
        check_finite(v, "the gradient of val_loss w.r.t. parameters")
        operator = StationarityJacobian.from_field(field, theta, phi, strict=False)
        # neumann(iters=K+1, residual=False) sums K+1 terms with K products and scales by α
        series = neumann(operator.matvec, v, self.truncate_iter + 1, self.hpo_lr, residual=False)
        p = tuple(t / self.hpo_lr for t in series.x)
        mixed = operator.mixed(p)
        if all(operator.unused):
            raise ValueError(
                "the gradient of train_loss w.r.t. parameters depends on none of aux_params, so "
                "AuxiLearn's hypergradient is identically zero: train_loss must be computed with the "
                "auxiliary model, and no op on the way may lack a double backward"
                f"{custom_functions(train_loss)}. If aux_params enter only val_loss, use an implicit "
                "mode (mode='implicit-cg'), which includes the direct term"
            )
        return tuple(-m for m in mixed)

    def _implicit_once(
        self, train_loss: Tensor, val_loss: Tensor, theta: Tensors, phi: Tensors, positions: list[int]
    ) -> Tensors:
        """:meth:`_implicit` with each tensor once: a tensor listed twice is one variable of the
        problem, and each of its places gets its full gradient."""
        first = _first_positions(theta)
        theta_once, phi_once = tuple(theta[i] for i in first), tuple(phi[i] for i in _first_positions(phi))
        solved = self._implicit(train_loss, val_loss, theta_once, phi_once, [positions[i] for i in first])
        by_tensor = {id(t): g for t, g in zip(phi_once, solved)}
        return tuple(by_tensor[id(t)] for t in phi)

    def _implicit(
        self, train_loss: Tensor, val_loss: Tensor, theta: Tensors, phi: Tensors, positions: list[int]
    ) -> Tensors:
        """The IFT hypergradient by the chosen mode, on the parameters ``train_loss`` uses
        (the others, if ``val_loss`` ignores them too, drop out of the system exactly)."""
        grads = torch.autograd.grad(val_loss, theta + phi, allow_unused=True, retain_graph=True)
        if all(g is None for g in grads):
            raise ValueError(
                "val_loss depends on neither parameters nor aux_params; compute it with the models"
            )
        in_train = reached(train_loss, theta)
        for i, (train_uses, g) in enumerate(zip(in_train, grads)):
            if g is not None and not train_uses:
                raise ValueError(
                    f"parameters[{positions[i]}] (shape {tuple(theta[i].shape)}) affects val_loss but not "
                    "train_loss, so the inner problem does not determine it and the implicit "
                    "hypergradient is undefined; leave it out of parameters, or use mode=None"
                )
        keep = [i for i, uses in enumerate(in_train) if uses]
        if not keep:
            raise ValueError("train_loss depends on none of parameters; compute it with the primary model")
        used = [theta[i] for i in keep]
        # a stand-in for val_loss with its value and its gradients, on a graph of its own: the
        # modes' backward through it cannot free a forward pass that train_loss shares
        outer = val_loss.detach() + sum(
            (g.detach() * (t - t.detach())).sum()
            for g, t in zip([grads[i] for i in keep] + list(grads[len(theta) :]), used + list(phi))
            if g is not None
        )
        assert self.hypergradient is not None  # _implicit runs for a mode only
        return self.hypergradient.solve(_GivenLosses(train_loss, outer, used, list(phi)))


class _GivenLosses(BilevelProblem):
    """A bilevel problem from loss tensors already computed at the current point. Implicit
    modes evaluate the losses only there, so the tensors stand in for the closures; any
    other evaluation point is refused."""

    def __init__(
        self, train_loss: Tensor, val_loss: Tensor, parameters: list[Tensor], aux_params: list[Tensor]
    ) -> None:
        self.losses = {"inner_loss": train_loss, "outer_loss": val_loss}
        super().__init__(self._refuse, self._refuse, parameters, aux_params)

    @staticmethod
    def _refuse(*args: Any) -> Tensor:
        raise ValueError(
            "MetaOptimizer receives loss tensors computed at the current parameters, so "
            "it supports only modes that evaluate the losses there (the implicit ones); "
            "use bilevel.auxiliary.AuxiliaryLearner, which takes loss functions"
        )

    def leaf_copies(
        self, theta: Tensors | None = None, phi: Tensors | None = None
    ) -> tuple[Tensors, Tensors]:
        if theta is not None or phi is not None:
            self._refuse()
        return self.theta0, self.phi0

    def _evaluate(
        self, name: str, theta: Tensors, phi: Tensors, extra: tuple = (), check: bool = True
    ) -> Tensor:
        if theta is not self.theta0 or phi is not self.phi0 or extra or name not in self.losses:
            self._refuse()
        return self.losses[name]


def _check_evaluates_only_here(mode: Mode) -> None:
    """Refuse a mode that evaluates the losses away from the current parameters: ``step``
    receives loss tensors, not functions."""
    if isinstance(mode, UnrolledMode | Penalty):
        raise ValueError(
            f"mode {mode.name!r} runs inner steps, which needs the training loss as a "
            "function, but MetaOptimizer.step receives loss tensors: use an implicit "
            "mode here, or bilevel.auxiliary.AuxiliaryLearner, which takes loss "
            "functions and runs any mode"
        )
    if isinstance(mode, ImplicitMode) and mode.rule.first_order:
        raise ValueError(
            "hvp='finite-difference' evaluates the training loss at points around the "
            "parameters, but MetaOptimizer.step receives loss tensors computed at the "
            "parameters: use bilevel.auxiliary.AuxiliaryLearner, which takes loss functions, "
            "or hvp='autograd'"
        )


def _trainable(tensors: Iterable[Tensor], name: str) -> tuple[Tensors, list[int]]:
    """The tensors (read once, generators included) that require grad, and their positions;
    frozen ones are skipped."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    try:
        items = list(tensors)
    except TypeError:
        raise TypeError(
            f"{name} must be an iterable of tensors (e.g. model.parameters()), got {type(tensors).__name__}"
        ) from None
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    positions = [i for i, t in enumerate(items) if t.requires_grad]
    if not positions:
        raise ValueError(
            f"{name} must contain at least one tensor that requires grad "
            f"(got {len(items)} tensors, none requiring grad)"
        )
    return tuple(items[i] for i in positions), positions


def _first_positions(tensors: Tensors) -> list[int]:
    """The positions of each tensor's first occurrence (by identity), in order."""
    first: dict[int, int] = {}
    for i, t in enumerate(tensors):
        first.setdefault(id(t), i)
    return list(first.values())


def _check_roles(val_loss: Tensor, theta: Tensors) -> None:
    """The primary parameters must reach the validation loss; if none does, the arguments
    are most likely swapped (then the step would move nothing and clear the primary ``.grad``)."""
    if not any(reached(val_loss, theta)):
        raise ValueError(
            "val_loss depends on none of parameters (the primary model's parameters, whose "
            "validation loss the auxiliary step lowers): parameters and aux_params look swapped. "
            "Call step(train_loss, val_loss, primary.parameters(), auxiliary.parameters())"
        )
