"""Warm-started CG in an online bilevel loop: Hessian-vector products saved at equal accuracy.

An online loop (a few inner optimizer steps, then one hypergradient step) changes the linear
system H x = ∂g/∂θ only a little between outer steps, so starting CG from the previous
solution should reach the same tolerance with fewer products. This script runs the same
200-step loop twice (cold and warm CG, same tolerance) and reports the products used and
how far apart the two runs' hyperparameters end up.

    python benchmarks/warm_start.py [--steps 200] [--tol 1e-6] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from bilevel import HyperGradient


def online_run(warm_start: bool, steps: int, tol: float, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g).to(device)
    w_true = torch.randn(32, 10, generator=g).to(device)
    y = (x @ w_true + torch.randn(512, 10, generator=g).to(device)).argmax(1)
    x_train, y_train, x_val, y_val = x[:384], y[:384], x[384:], y[384:]
    torch.manual_seed(seed)
    model = nn.Linear(32, 10).to(device)  # softmax regression: a convex inner problem
    log_decay = torch.full((10, 32), -3.0, device=device, requires_grad=True)  # per weight
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    outer_opt = torch.optim.Adam([log_decay], lr=0.02)
    hg = HyperGradient("implicit-cg", iters=200, tol=tol, warm_start=warm_start)

    def train_loss(m, d):
        penalty = (d.exp() * m.weight**2).sum()
        return nn.functional.cross_entropy(m(x_train), y_train) + 0.5 * penalty

    def val_loss(m, d):
        return nn.functional.cross_entropy(m(x_val), y_val)

    for _ in range(200):  # warm-up: get near a minimum first
        inner_opt.zero_grad()
        train_loss(model, log_decay.detach()).backward()
        inner_opt.step()
    products, residuals = 0, []
    for _ in range(steps):
        for _ in range(5):
            inner_opt.zero_grad()
            train_loss(model, log_decay.detach()).backward()
            inner_opt.step()
        outer_opt.zero_grad()
        hg.backward(train_loss, val_loss, model, log_decay)
        outer_opt.step()
        products += hg.stats.hvps
        residuals.append(hg.stats.residual)
    with torch.no_grad():
        return products, max(residuals), log_decay.clone(), float(val_loss(model, log_decay))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cold = online_run(False, args.steps, args.tol, args.device)
    warm = online_run(True, args.steps, args.tol, args.device)
    print(f"{'':6} {'products':>9} {'max residual':>13} {'mean log decay':>15} {'val loss':>9}")
    for name, (products, residual, decay, val) in (("cold", cold), ("warm", warm)):
        print(f"{name:6} {products:9d} {residual:13.1e} {float(decay.mean()):15.5f} {val:9.5f}")
    gap = float((warm[2] - cold[2]).norm() / (cold[2] + 3.0).norm())
    print(f"relative gap between the runs' hyperparameter moves: {gap:.1e}")
    print(f"warm start saves {1 - warm[0] / cold[0]:.0%} of the Hessian-vector products")


if __name__ == "__main__":
    main()
