"""Bilevel test problems with known answers, shared by the test modules (float64).

``ridge``: inner f(w, λ) = ½‖Xw − y‖²/n + ½ Σ exp(λᵢ) wᵢ², outer g(w) = ½‖X_v w − y_v‖²/n_v.
Closed form w*(λ) = (XᵀX/n + diag(exp λ))⁻¹ Xᵀy/n, and the exact hypergradient by autograd
through that solve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class Problem:
    inner_loss: Callable
    outer_loss: Callable
    inner_solve: Callable[[Tensor], Tensor]
    hparams: Tensor

    def params_star(self) -> Tensor:
        return self.inner_solve(self.hparams.detach()).detach().requires_grad_()

    def exact_hypergradient(self) -> Tensor:
        """dg/dλ by differentiating through the closed-form (or converged) inner solution."""
        h = self.hparams.detach().clone().requires_grad_()
        return torch.autograd.grad(self.outer_loss(self.inner_solve(h), h), h)[0]


def ridge(n: int = 40, p: int = 6, n_val: int = 30, seed: int = 0, dtype=torch.float64,
          device="cpu", outer_uses_hparams: bool = False) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=dtype).to(device)
    w_true = torch.randn(p, generator=g, dtype=dtype).to(device)
    y = x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=dtype).to(device)
    xv = torch.randn(n_val, p, generator=g, dtype=dtype).to(device)
    yv = xv @ w_true + 0.5 * torch.randn(n_val, generator=g, dtype=dtype).to(device)
    hparams = (0.3 * torch.randn(p, generator=g, dtype=dtype) - 1.0).to(device).requires_grad_()

    def inner_loss(w, lam):
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w ** 2).sum()

    def outer_loss(w, lam):
        loss = 0.5 * ((xv @ w - yv) ** 2).mean()
        return loss + 0.01 * (lam ** 2).sum() if outer_uses_hparams else loss

    def inner_solve(lam):
        a = x.T @ x / n + torch.diag(lam.exp())
        return torch.linalg.solve(a, x.T @ y / n)

    return Problem(inner_loss, outer_loss, inner_solve, hparams)


def logistic(n: int = 60, p: int = 5, n_val: int = 40, seed: int = 1, dtype=torch.float64,
             device="cpu") -> Problem:
    """L2-regularised logistic regression with per-feature log weight decay; the inner
    solution comes from Newton's method run to machine precision (differentiable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=dtype).to(device)
    w_true = torch.randn(p, generator=g, dtype=dtype).to(device)
    y = (x @ w_true + 0.3 * torch.randn(n, generator=g, dtype=dtype).to(device) > 0).to(dtype)
    xv = torch.randn(n_val, p, generator=g, dtype=dtype).to(device)
    yv = (xv @ w_true > 0).to(dtype)
    hparams = (0.2 * torch.randn(p, generator=g, dtype=dtype) - 2.0).to(device).requires_grad_()
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def inner_loss(w, lam):
        return bce(x @ w, y) + 0.5 * (lam.exp() * w ** 2).sum()

    def outer_loss(w, lam):
        return bce(xv @ w, yv)

    def inner_solve(lam):
        w = torch.zeros(p, dtype=dtype, device=device)
        for _ in range(30):  # Newton; the last steps are differentiable in lam
            s = torch.sigmoid(x @ w)
            grad = x.T @ (s - y) / n + lam.exp() * w
            hess = (x.T * (s * (1 - s))) @ x / n + torch.diag(lam.exp())
            w = w - torch.linalg.solve(hess, grad)
        return w

    return Problem(inner_loss, outer_loss, inner_solve, hparams)


class _Square(torch.autograd.Function):
    """x² with a backward marked ``@once_differentiable``: no second derivative through it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad
