"""Bilevel test problems with known answers, shared by the test modules (float64).

Every problem used by more than one test module (or twice in one) is defined here, once.

``ridge``: inner f(w, λ) = ½‖Xw − y‖²/n + ½ Σ exp(λᵢ) wᵢ², outer g(w) = ½‖X_v w − y_v‖²/n_v.
Closed form w*(λ) = (XᵀX/n + diag(exp λ))⁻¹ Xᵀy/n, and the exact hypergradient by autograd
through that solve. ``logistic``: the same with a logistic loss, solved by Newton's method.

Small problems returned as ``(inner_loss, outer_loss, params, hparams)``, ready for
``HyperGradient.compute(*problem)``: ``saddle`` (indefinite Hessian), ``singular`` (singular
Hessian), ``shrinkage`` (a quadratic with one scalar hparam, any size and dtype). Set-ups with
data: ``split_ridge`` (an online loop's ridge problem), ``batchnorm_regression`` (a BatchNorm
MLP with a log weight decay).

Helpers the test modules share: ``rel_error``, ``roundtrip`` (a checkpoint through
torch.save/load), ``plain_steps`` (a torch optimizer's plain steps, the unrolled reference),
``load_script`` (an example or benchmark imported by path).
"""

from __future__ import annotations

import importlib.util
import io
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call


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


def ridge_loss(w: Tensor, lam: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The ridge inner loss on data (x, y): ½‖xw − y‖²/n + ½ Σ exp(λᵢ) wᵢ²."""
    return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()


def ridge(
    n: int = 40,
    p: int = 6,
    n_val: int = 30,
    seed: int = 0,
    dtype=torch.float64,
    device="cpu",
    outer_uses_hparams: bool = False,
) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=dtype).to(device)
    w_true = torch.randn(p, generator=g, dtype=dtype).to(device)
    y = x @ w_true + 0.5 * torch.randn(n, generator=g, dtype=dtype).to(device)
    xv = torch.randn(n_val, p, generator=g, dtype=dtype).to(device)
    yv = xv @ w_true + 0.5 * torch.randn(n_val, generator=g, dtype=dtype).to(device)
    hparams = (0.3 * torch.randn(p, generator=g, dtype=dtype) - 1.0).to(device).requires_grad_()

    def inner_loss(w, lam):
        return ridge_loss(w, lam, x, y)

    def outer_loss(w, lam):
        loss = 0.5 * ((xv @ w - yv) ** 2).mean()
        return loss + 0.01 * (lam**2).sum() if outer_uses_hparams else loss

    def inner_solve(lam):
        a = x.T @ x / n + torch.diag(lam.exp())
        return torch.linalg.solve(a, x.T @ y / n)

    return Problem(inner_loss, outer_loss, inner_solve, hparams)


def logistic(
    n: int = 60, p: int = 5, n_val: int = 40, seed: int = 1, dtype=torch.float64, device="cpu"
) -> Problem:
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
        return bce(x @ w, y) + 0.5 * (lam.exp() * w**2).sum()

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


def saddle():
    """f(w, φ) = ½ wᵀ diag(1, −1) w − φᵀw at its stationary point w = (φ₀, −φ₁): indefinite H.
    Outer ‖w‖². Returns (inner, outer, theta, phi)."""
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64)
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    phi = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)

    def inner(w, p):
        return 0.5 * (signs * w * w).sum() - (p * w).sum()

    def outer(w, p):
        return (w**2).sum()

    return inner, outer, theta, phi


def singular():
    """f(w, φ) = ½(w₀ + w₁)² + φ·w₀: H = [[1, 1], [1, 1]] is singular (so is any Nyström core).
    Outer ‖w‖². Returns (inner, outer, theta, phi)."""

    def inner(w, p):
        return 0.5 * (w[0] + w[1]) ** 2 + p[0] * w[0]

    def outer(w, p):
        return (w**2).sum()

    return (
        inner,
        outer,
        torch.tensor([-1.0, 0.0], dtype=torch.float64, requires_grad=True),
        torch.tensor([1.0], dtype=torch.float64, requires_grad=True),
    )


def shrinkage(p: int, dtype: torch.dtype = torch.float64):
    """f(w, h) = ‖w − 1‖² + h‖w‖², g(w) = ‖w‖², at w = 0 (p entries) and h = 0.1: a problem of
    any size and dtype, for checkpoint and layout checks. Returns (inner, outer, w, h)."""
    w = torch.zeros(p, dtype=dtype, requires_grad=True)
    lam = torch.tensor(0.1, dtype=dtype, requires_grad=True)

    def inner(w, h):
        return ((w - 1) ** 2).sum() + h * (w**2).sum()

    def outer(w, h):
        return (w**2).sum()

    return inner, outer, w, lam


def split_ridge(n: int, p: int, val_rows: int, device="cpu", seed: int = 0):
    """An online loop's ridge problem: random data (x, y) with n rows, the ridge inner loss on
    all of them, outer ½‖x_v w − y_v‖²/n_v on the first ``val_rows``; w = 0, λ = −1.
    Returns (x, y, w, lam, inner, outer)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    w = torch.zeros(p, dtype=torch.float64, device=device, requires_grad=True)
    lam = torch.full((p,), -1.0, dtype=torch.float64, device=device, requires_grad=True)

    def inner(w, lam):
        return ridge_loss(w, lam, x, y)

    def outer(w, lam):
        return 0.5 * ((x[:val_rows] @ w - y[:val_rows]) ** 2).mean()

    return x, y, w, lam, inner, outer


def batchnorm_regression(
    seed: int = 0,
    *,
    model_seed: int | None = None,
    hidden: int = 4,
    n: int = 32,
    val_rows: int | None = None,
    freeze_first_bias: bool = False,
):
    """A 3-``hidden``-1 tanh MLP with BatchNorm (float64, training mode: batch statistics and
    running buffers) and a scalar log weight decay d = −2: inner ‖m(x) − y‖²/n + eᵈ Σ‖p‖²
    over all parameters, outer the squared error on the first ``val_rows`` rows (all when
    None). Data from ``seed``, the initial weights from ``model_seed`` (default: ``seed``);
    ``freeze_first_bias`` makes the first layer's bias a constant. Returns
    (model, decay, inner, outer, x, y)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed if model_seed is None else model_seed)
    model = nn.Sequential(
        nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Linear(hidden, 1)
    ).double()
    if freeze_first_bias:
        model[0].bias.requires_grad_(False)
    decay = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)

    def inner(m, d):
        return ((m(x) - y) ** 2).mean() + d.exp() * sum((p**2).sum() for p in m.parameters())

    def outer(m, d):
        return ((m(x[:val_rows]) - y[:val_rows]) ** 2).mean()

    return model, decay, inner, outer, x, y


# ------------------------------------------------------------------------------ helpers
def load_script(path: Path, name: str | None = None):
    """The script at ``path`` (an example or a benchmark) imported as the module ``name``
    (default: the file's stem), registered in ``sys.modules`` so that the scripts can import
    each other (overhead.py imports bench) and dataclasses find their module."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def plain_steps(loss: Callable[[Tensor], Tensor], start: Tensor, optimizer, steps: int, **options) -> Tensor:
    """A copy of ``start`` after ``steps`` ordinary steps of ``optimizer(params, **options)`` on
    ``loss(θ)``: the reference for what an unrolled mode's inner optimizer does."""
    theta = start.clone().requires_grad_()
    opt = optimizer([theta], **options)
    for _ in range(steps):
        opt.zero_grad()
        loss(theta).backward()
        opt.step()
    return theta


def roundtrip(state, weights_only: bool = True, **load):
    """``state`` through ``torch.save``/``torch.load`` (``load``: its keywords, such as
    ``map_location``), as a checkpoint on disk would go."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only, **load)


def rel_error(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


def symmetric_system(eigenvalues, seed: int = 0):
    """A symmetric matrix with the given spectrum, its matvec on a 2-tensor tuple, and v."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T
    v = (
        torch.randn(n - 2, generator=g, dtype=torch.float64),
        torch.randn(2, generator=g, dtype=torch.float64),
    )

    def matvec(x):
        out = matrix @ torch.cat(x)
        return out[:-2], out[-2:]

    return matrix, matvec, v


def mse(a, b):
    # not F.mse_loss: torch's forward-over-reverse of its backward writes into an implicit zero
    # tangent (RuntimeError "ZeroTensors are immutable"), which direction="forward" needs
    return ((a - b) ** 2).mean()


def sgd_rule(theta, grads, state, t, lr, momentum=0.0, weight_decay=0.0):
    """torch.optim.SGD's rule: g + wd·θ; b = g at the first step, else μ·b + g; θ − lr·b."""
    grads = [g + weight_decay * p for g, p in zip(grads, theta)]
    if momentum:
        state = grads if t == 0 else [momentum * b + g for b, g in zip(state, grads)]
        grads = state
    return [p - lr * g for p, g in zip(theta, grads)], state


def maml_reference(model, task, rule, steps=5, **options):
    """dg(θ_T)/dφ by hand: θ_0 = φ (the module's own parameters), ``steps`` steps of ``rule``."""
    xs, ys, xq, yq = task
    names = [n for n, _ in model.named_parameters()]
    phi = [p for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss(theta, x, y):
        return mse(functional_call(model, {**dict(zip(names, theta)), **buffers}, (x,)), y)

    theta, state = list(phi), None
    for t in range(steps):
        grads = torch.autograd.grad(loss(theta, xs, ys), theta, create_graph=True)
        theta, state = rule(theta, grads, state, t, **options)
    return dict(zip(names, torch.autograd.grad(loss(theta, xq, yq), phi)))
