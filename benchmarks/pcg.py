"""Nyström-preconditioned CG in an online bilevel loop: products per call against plain CG.

A ridge problem with P features and a per-feature log weight decay λ (P hparams): inner
f(w, λ) = ½ wᵀGw − bᵀw + ½ Σ exp(λᵢ) wᵢ² with G = XᵀX/n = Q diag(1/j²) Qᵀ (feature scales
falling as 1/j in a random orthogonal basis, as in ``krylov.py``), outer g(w) = ½‖X_v w −
y_v‖²/n_v. The initial decay sets κ(H) = κ(G + diag(exp λ)): about 1e2 or 1e4. Each outer
step solves the inner problem in closed form (a Cholesky solve), asks ``implicit-cg`` for the
hypergradient and takes one small Adam step on λ, so the system changes a little per call.
A second spectrum, ``loguniform``, spaces the feature scales evenly on a log scale over the
same range instead: no few eigenvalues stand out, which is where a low-rank sketch cannot help.

Each run uses the same ``tol`` (relative residual) and reports the mean Hessian-vector
products per call (the sketches' products included), the largest residual, the sketches
made, and the relative gap of its final λ to plain CG's (same accuracy: the runs follow the
same path). Plain CG and PCG of each rank, with ``warm_start`` off and on.

    python benchmarks/pcg.py [--steps 200] [--size 1000] [--ranks 10 20 40] [--tol 1e-6]
                             [--spectra power loguniform]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from bilevel import HyperGradient

f64 = torch.float64
CONDITIONS = (1e2, 1e4)
SPECTRA = ("power", "loguniform")


@dataclass
class Ridge:
    gram: torch.Tensor  # G = XᵀX/n
    b: torch.Tensor  # Xᵀy/n
    x_val: torch.Tensor
    y_val: torch.Tensor
    decay: float  # the initial exp(λ)

    def inner_loss(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * w @ (self.gram @ w) - self.b @ w + 0.5 * (lam.exp() * w**2).sum()

    def outer_loss(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.x_val @ w - self.y_val) ** 2).mean()

    def solve(self, lam: torch.Tensor) -> torch.Tensor:
        factor = torch.linalg.cholesky(self.gram + torch.diag(lam.exp()))
        return torch.cholesky_solve(self.b[:, None], factor)[:, 0]


def ridge(size: int, condition: float, spectrum: str = "power", seed: int = 0) -> Ridge:
    """G = Q diag(s²) Qᵀ with feature scales s_j = 1/j (``power``) or log-uniform over the
    same range, 1 to 1/P (``loguniform``), and a decay d with (1 + d)/(1/P² + d) = κ."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=f64))
    if spectrum == "power":
        scales = 1.0 / torch.arange(1, size + 1, dtype=f64)
    else:
        scales = torch.logspace(0, -math.log10(size), size, dtype=f64)
    gram = basis @ torch.diag(scales**2) @ basis.T
    w_true = torch.randn(size, generator=g, dtype=f64)
    b = gram @ w_true + 0.1 * torch.randn(size, generator=g, dtype=f64) / size**0.5
    x_val = torch.randn(200, size, generator=g, dtype=f64) @ torch.diag(scales) @ basis.T
    y_val = x_val @ w_true + 0.1 * torch.randn(200, generator=g, dtype=f64)
    smallest = float(scales[-1] ** 2)
    decay = (1.0 - condition * smallest) / (condition - 1.0)
    return Ridge(gram, b, x_val, y_val, decay)


def online_run(problem: Ridge, steps: int, tol: float, warm: bool, rank: int | None, lr: float) -> dict:
    """``steps`` outer steps; the products, residuals and sketches of every call."""
    size = problem.gram.shape[0]
    lam = torch.full((size,), float(torch.tensor(problem.decay).log()), dtype=f64, requires_grad=True)
    outer = torch.optim.Adam([lam], lr=lr)
    options = {"preconditioner": "nystrom", "rank": rank} if rank else {}
    hg = HyperGradient("implicit-cg", iters=2000, tol=tol, warm_start=warm, **options)
    products, residuals, sketches = [], [], 0
    for _ in range(steps):
        w = problem.solve(lam.detach()).requires_grad_()
        outer.zero_grad()
        lam.grad = hg.compute(problem.inner_loss, problem.outer_loss, w, lam)
        outer.step()
        products.append(hg.stats.hvps)
        residuals.append(hg.stats.residual)
        sketches += bool(hg.stats.extra.get("preconditioner", {}).get("refreshed"))
    return {"products": products, "residual": max(residuals), "sketches": sketches, "lam": lam.detach()}


def condition_number(problem: Ridge) -> float:
    values = torch.linalg.eigvalsh(problem.gram + problem.decay * torch.eye(problem.gram.shape[0], dtype=f64))
    return float(values[-1] / values[0])


def rows_for(problem: Ridge, spectrum: str, args: argparse.Namespace) -> list[tuple]:
    """Plain CG and PCG of each rank, warm start off and on, printed as they finish."""
    kappa, rows = condition_number(problem), []
    for warm in (False, True):
        base = online_run(problem, args.steps, args.tol, warm, None, args.lr)
        base_mean = sum(base["products"]) / args.steps
        for rank in [None, *args.ranks]:
            run = base if rank is None else online_run(problem, args.steps, args.tol, warm, rank, args.lr)
            mean = sum(run["products"]) / args.steps
            gap = float((run["lam"] - base["lam"]).norm() / base["lam"].norm())
            name = "cg" if rank is None else f"pcg-{rank}"
            rows.append(
                (spectrum, kappa, warm, name, mean, base_mean / mean, run["sketches"], run["residual"], gap)
            )
            print(
                f"{spectrum:>10} {kappa:8.1e} {warm!s:>5} {name:>7} {mean:14.1f} {base_mean / mean:5.2f}x "
                f"{run['sketches']:9d} {run['residual']:13.1e} {gap:12.1e}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--spectra", nargs="+", choices=SPECTRA, default=list(SPECTRA))
    args = parser.parse_args(argv)
    print(
        f"{'spectrum':>10} {'κ':>8} {'warm':>5} {'solver':>7} {'products/call':>14} {'vs cg':>6} "
        f"{'sketches':>9} {'max residual':>13} {'λ gap to cg':>12}"
    )
    rows = []
    for spectrum in args.spectra:
        for condition in CONDITIONS:
            rows += rows_for(ridge(args.size, condition, spectrum), spectrum, args)
    return rows


if __name__ == "__main__":
    main()
