"""A drop-in for AuxiLearn's ``MetaOptimizer``, with its failures fixed and any mode available."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ..errors import check_finite, second_order_guard
from ..hypergradient import HyperGradient
from ..operators import StationarityJacobian
from ..problem import BilevelProblem
from ..solvers import Tensors, neumann


class MetaOptimizer:
    """Update auxiliary parameters with hypergradients of a validation (main-task) loss.

    Drop-in for AuxiLearn's class: same constructor and ``step`` arguments, in the same order.

    With ``mode=None`` (default) the hypergradient is AuxiLearn's, number for number:
    ``−(∇²φθ f) p`` with ``p = Σ_{j=0..K} (I − αH)ʲ ∂g/∂θ``, ``α = hpo_lr``, ``K = truncate_iter``
    (K Hessian-vector products), ``p`` not multiplied by α and the direct term ∂g/∂φ left out.
    For small α, ``p ≈ (K+1)·∂g/∂θ``: an identity-Hessian approximation scaled by K+1 rather
    than the IFT hypergradient, and AuxiLearn users' meta learning rates are tuned to that
    scale; swapping the import keeps their training dynamics. For the true IFT hypergradient (direct term
    included) pass a registered implicit mode, e.g. ``mode="implicit-cg"`` (with its options
    as keywords); the meta learning rate then usually needs retuning.

    Unlike the original it accepts generators as ``parameters``/``aux_params``, gives zero
    hypergradients for parameters that a loss does not use (instead of crashing on None), and
    names ops that have no double backward.

    Args:
        meta_optimizer: a torch optimizer over the auxiliary parameters.
        hpo_lr: α, the step of the Neumann series (default mode).
        truncate_iter: K, the number of Neumann products (default mode).
        max_grad_norm: clip the auxiliary gradients to this norm before the step (None: no clip).
        mode: None for AuxiLearn's formula, or a registered implicit mode name.
        **mode_options: options of that mode.
    """

    def __init__(self, meta_optimizer: torch.optim.Optimizer, hpo_lr: float, truncate_iter: int = 3,
                 max_grad_norm: float | None = 10, mode: str | None = None, **mode_options: Any) -> None:
        if hpo_lr <= 0:
            raise ValueError(f"hpo_lr must be > 0, got {hpo_lr}")
        if not isinstance(truncate_iter, int) or truncate_iter < 0:
            raise ValueError(f"truncate_iter must be an int >= 0, got {truncate_iter!r}")
        if mode is None and mode_options:
            raise TypeError(f"options {sorted(mode_options)} need a mode; AuxiLearn's formula "
                            "(mode=None) takes only hpo_lr and truncate_iter")
        self.meta_optimizer = meta_optimizer
        self.hpo_lr = hpo_lr
        self.truncate_iter = truncate_iter
        self.max_grad_norm = max_grad_norm
        self.hypergradient = None if mode is None else HyperGradient(mode, **mode_options)

    def step(self, train_loss: Tensor, val_loss: Tensor, parameters: Iterable[Tensor],
             aux_params: Iterable[Tensor], return_grads: bool = False) -> Tensors | None:
        """Compute the hypergradient of ``val_loss`` w.r.t. ``aux_params`` through the inner
        problem of ``train_loss`` over ``parameters``, write it into the auxiliary ``.grad``
        (after zeroing the meta optimizer), clip, and take a meta-optimizer step.

        ``train_loss`` and ``val_loss`` are scalar tensors computed at the current parameters.
        The primary parameters' ``.grad`` is never touched. Returns the hypergradients if
        ``return_grads``.
        """
        parameters, aux_params = list(parameters), list(aux_params)
        for name, tensors in (("parameters", parameters), ("aux_params", aux_params)):
            if not tensors or not all(isinstance(t, Tensor) and t.requires_grad for t in tensors):
                raise ValueError(f"{name} must be a non-empty iterable of tensors that require grad")
        for name, loss in (("train_loss", train_loss), ("val_loss", val_loss)):
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(f"{name} must be a scalar tensor with a graph to the parameters")
        if self.hypergradient is None:
            grads = self._auxilearn(train_loss, val_loss, tuple(parameters), tuple(aux_params))
        else:
            grads = self.hypergradient.solve(_GivenLosses(train_loss, val_loss, parameters, aux_params))
        self.meta_optimizer.zero_grad()
        for p, g in zip(aux_params, grads):
            p.grad = g.detach().clone()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(aux_params, self.max_grad_norm)
        self.meta_optimizer.step()
        return grads if return_grads else None

    def _auxilearn(self, train_loss: Tensor, val_loss: Tensor, theta: Tensors, phi: Tensors) -> Tensors:
        with second_order_guard("the gradient of train_loss"):
            field = torch.autograd.grad(train_loss, theta, create_graph=True, allow_unused=True)
        v = torch.autograd.grad(val_loss, theta, allow_unused=True)
        v = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(v, theta))
        check_finite(v, "the gradient of val_loss w.r.t. parameters")
        operator = StationarityJacobian(field, theta, phi, strict=False)
        series = neumann(operator.matvec, v, self.truncate_iter + 1, self.hpo_lr, residual=False)
        p = tuple(t / self.hpo_lr for t in series.x)  # AuxiLearn does not multiply by α
        return tuple(-m for m in operator.mixed(p))


class _GivenLosses(BilevelProblem):
    """A bilevel problem from loss tensors already computed at the current point: implicit
    modes evaluate the losses only there, so the tensors stand in for the closures."""

    def __init__(self, train_loss: Tensor, val_loss: Tensor, parameters: list[Tensor],
                 aux_params: list[Tensor]) -> None:
        self.losses = {"inner_loss": train_loss, "outer_loss": val_loss}
        super().__init__(self._refuse, self._refuse, list(parameters), list(aux_params))

    @staticmethod
    def _refuse(*args: Any) -> Tensor:
        raise ValueError("MetaOptimizer receives loss tensors, so it supports the implicit modes "
                         "only; for unrolled modes use bilevel.auxiliary.AuxiliaryLearner, which "
                         "takes loss functions")

    def leaf_copies(self, theta: Tensors | None = None, phi: Tensors | None = None) -> tuple[Tensors, Tensors]:
        if theta is not None or phi is not None:
            self._refuse()
        return self.theta0, self.phi0

    def _evaluate(self, name: str, theta: Tensors, phi: Tensors, extra: tuple = ()) -> Tensor:
        if theta is not self.theta0 or phi is not self.phi0 or extra:
            self._refuse()
        return self.losses[name]
