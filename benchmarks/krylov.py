"""Krylov solvers on ill-conditioned and indefinite systems: products to a tolerance, and
what each returns at a non-convex point.

Table 1: Hessian-vector products for CG, re-orthogonalised CG, MINRES and GMRES to reach a
relative residual of 1e-6 (float64) or 1e-3 (float32) on SPD systems with P = 1000 and
κ = 1e2, 1e4, 1e6: a ridge Hessian ``XᵀX/n + λI`` whose feature scales fall as 1/j (λ sets
κ), and a log-uniform spectrum in a random orthogonal basis. Each cell is the products the
solver spent by its own stopping test, with the true residual ‖v − Hx‖/‖v‖ of what it
returned; ``>N`` when it did not stop within the budget.

Table 2: a tanh MLP trained by Adam, near a minimum but with negative Hessian eigenvalues.
The IFT solve ``H x = ∂g/∂θ`` on its exact Hessian (a dense matrix, so every method sees the
same products): plain CG returning the iterate before the negative curvature (the library's
behaviour before), CG returning its minimum-residual iterate (now), the damping ramp
(``implicit-cg`` with ``damping="auto"``), MINRES and GMRES, against the dense solve:
relative errors of ``x`` and of the hypergradient, products.

    python benchmarks/krylov.py [--quick]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch

from bilevel._src.solvers import conjugate_gradient, damping_ramp, gmres, minres, power_iteration

f64 = torch.float64
Solver = Callable[[Callable, tuple, int, float], Any]

SOLVERS: dict[str, Solver] = {
    "cg": lambda mv, v, budget, tol: conjugate_gradient(mv, v, budget, tol),
    "cg reorth": lambda mv, v, budget, tol: conjugate_gradient(mv, v, budget, tol, reorthogonalize=True),
    "minres": lambda mv, v, budget, tol: minres(mv, v, budget, tol),
    "gmres": lambda mv, v, budget, tol: gmres(mv, v, min(budget, v[0].numel()), tol),
}


def ridge_system(kappa: float, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``XᵀX/n + λI`` (n = 2P, feature j scaled by 1/j), λ chosen for condition number κ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * size, size, generator=g, dtype=f64) / torch.arange(1, size + 1, dtype=f64)
    gram = x.T @ x / (2 * size)
    low, high = torch.linalg.eigvalsh(gram)[[0, -1]].tolist()
    shift = max((high - kappa * low) / (kappa - 1), 0.0)
    v = x.T @ torch.randn(2 * size, generator=g, dtype=f64) / (2 * size)
    return gram + shift * torch.eye(size, dtype=f64), v


def log_uniform_system(kappa: float, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues spread log-uniformly over [1/κ, 1], in a random orthogonal basis."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=f64))
    eigenvalues = torch.logspace(0.0, -math.log10(kappa), size, dtype=f64)
    return (basis * eigenvalues) @ basis.T, torch.randn(size, generator=g, dtype=f64)


def products_table(size: int, kappas: list[float], dtypes: list[torch.dtype], budget: int) -> list[tuple]:
    rows = []
    for family, build in (("ridge", ridge_system), ("log-uniform", log_uniform_system)):
        for kappa in kappas:
            matrix64, v64 = build(kappa, size)
            for dtype in dtypes:
                tol = 1e-6 if dtype == f64 else 1e-3
                matrix, v = matrix64.to(dtype), v64.to(dtype)
                cells = {}
                for name, solve in SOLVERS.items():
                    result = solve(lambda x, m=matrix: (m @ x[0],), (v,), budget, tol)
                    true = float((v64 - matrix64 @ result.x[0].to(f64)).norm() / v64.norm())
                    cells[name] = (result.products, bool(result.converged), true)
                rows.append((family, kappa, str(dtype).removeprefix("torch."), tol, cells))
    return rows


def print_products(rows: list[tuple], budget: int) -> None:
    print("\nproducts to the tolerance (true residual of the returned x)")
    print(f"{'system':<12}{'κ':>7} {'dtype':<8}{'tol':>6}" + "".join(f"{n:>22}" for n in SOLVERS))
    for family, kappa, dtype, tol, cells in rows:
        text = ""
        for products, converged, true in cells.values():
            count = str(products) if converged else f">{budget}" if products >= budget else f"{products}!"
            text += f"{count:>12} ({true:7.1e})"
        print(f"{family:<12}{kappa:>7.0e} {dtype:<8}{tol:>6.0e}{text}")


def tanh_mlp(hidden: int, steps: int, n: int = 200, features: int = 8, seed: int = 0) -> dict[str, Any]:
    """A two-hidden-layer tanh MLP (float64) with a log weight decay per tensor (the hparams),
    trained ``steps`` Adam steps; returns its exact Hessian ``H``, ``v = ∂g/∂θ``, the mixed
    matrix ``∂²f/∂θ∂φ`` (P × k) and the direct term ``∂g/∂φ`` (zero here)."""
    g = torch.Generator().manual_seed(seed)
    x, xv = (torch.randn(n, features, generator=g, dtype=f64) for _ in range(2))
    w_true = torch.randn(features, generator=g, dtype=f64)
    y, yv = torch.sin(x @ w_true).unsqueeze(1), torch.sin(xv @ w_true).unsqueeze(1)
    shapes = [(features, hidden), (hidden,), (hidden, hidden), (hidden,), (hidden, 1), (1,)]
    sizes = [math.prod(s) for s in shapes]
    theta = torch.cat([torch.randn(s, generator=g, dtype=f64).reshape(-1) / math.sqrt(s[0]) for s in shapes])
    decay = torch.full((len(shapes),), -6.0, dtype=f64)

    def net(flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        w = [c.reshape(s) for c, s in zip(flat.split(sizes), shapes)]
        hidden_1 = torch.tanh(inputs @ w[0] + w[1])
        return torch.tanh(hidden_1 @ w[2] + w[3]) @ w[4] + w[5]

    def inner(flat: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        penalty = sum(di.exp() * (c**2).sum() for di, c in zip(d, flat.split(sizes)))
        return ((net(flat, x) - y) ** 2).mean() + 0.5 * penalty

    def outer(flat: torch.Tensor) -> torch.Tensor:
        return ((net(flat, xv) - yv) ** 2).mean()

    theta.requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        inner(theta, decay).backward()
        optimizer.step()
    theta = theta.detach()
    hessian = torch.func.hessian(inner, argnums=0)(theta, decay)
    mixed = torch.func.jacfwd(torch.func.grad(inner, argnums=0), argnums=1)(theta, decay)
    v = torch.func.grad(outer)(theta)
    return {"H": 0.5 * (hessian + hessian.T), "v": v, "mixed": mixed, "P": theta.numel()}


def textbook_cg(matvec: Callable, v: torch.Tensor, iters: int, tol: float) -> tuple[torch.Tensor, int]:
    """CG that keeps its last iterate and stops before a step of negative curvature (the
    library's behaviour before the minimum-residual rule)."""
    x, r = torch.zeros_like(v), v.clone()
    p, rs = r.clone(), float(r @ r)
    for k in range(1, iters + 1):
        ap = matvec(p)
        curvature = float(p @ ap)
        if curvature <= 0.0:
            return x, k
        step = rs / curvature
        x, r = x + step * p, r - step * ap
        rs, previous = float(r @ r), rs
        if math.sqrt(rs) <= tol * float(v.norm()):
            return x, k
        p = r + (rs / previous) * p
    return x, iters


def indefinite_table(hidden: int, steps: int, budget: int, tol: float = 1e-6) -> dict[str, dict]:
    problem = tanh_mlp(hidden, steps)
    hessian, v, mixed = problem["H"], problem["v"], problem["mixed"]
    eigenvalues, basis = torch.linalg.eigh(hessian)
    exact = torch.linalg.solve(hessian, v)
    negative = eigenvalues < 0
    share = float((basis[:, negative].T @ exact).norm() / exact.norm())
    print(
        f"\ntanh MLP, P = {problem['P']}, {steps} Adam steps: {int(negative.sum())} negative eigenvalues "
        f"(most negative {float(eigenvalues[0]):.1e}), λmax {float(eigenvalues[-1]):.2f}; "
        f"{share:.0%} of the dense x's norm lies in the negative-curvature directions"
    )
    matvec = lambda x: (hessian @ x[0],)
    hypergradient = -mixed.T @ exact
    rows: dict[str, dict] = {}

    def row(name: str, x: torch.Tensor, products: int, note: str = "") -> None:
        residual = float((v - hessian @ x).norm() / v.norm())
        error = float((x - exact).norm() / exact.norm())
        hg_error = float((-mixed.T @ x - hypergradient).norm() / hypergradient.norm())
        rows[name] = {"error": error, "hg_error": hg_error, "products": products, "residual": residual}
        print(f"{name:<28}{error:>12.2e}{hg_error:>12.2e}{residual:>12.2e}{products:>10}  {note}")

    print(f"{'':<28}{'x error':>12}{'hg error':>12}{'residual':>12}{'products':>10}")
    x, products = textbook_cg(lambda p: hessian @ p, v, budget, tol)
    row("cg, last iterate (before)", x, products)
    result = conjugate_gradient(matvec, (v,), budget, tol)
    row("cg, min-residual (now)", result.x[0], result.products, f"iterate {result.iterate}")
    largest = power_iteration(matvec, (v,), 10, torch.Generator().manual_seed(0))
    ramp, damping = damping_ramp(matvec, (v,), budget, tol, 1e-2 * largest)
    damped = torch.linalg.solve(hessian + damping * torch.eye(len(v), dtype=f64), v)
    off = float((ramp.x[0] - damped).norm() / damped.norm())
    row("cg, damping='auto'", ramp.x[0], ramp.products + 10, f"λ = {damping:.2e}; {off:.0e} from its dense")
    for name, solve in (("minres", minres), ("gmres", gmres)):
        result = solve(matvec, (v,), min(budget, len(v)) if name == "gmres" else budget, tol)
        row(name, result.x[0], result.products)
    row("dense", exact, len(v), "torch.linalg.solve")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for the smoke test")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are small; BLAS threads only add contention
    try:
        if args.quick:
            rows = products_table(200, [1e2, 1e4], [f64], 600)
            print_products(rows, 600)
            mlp = indefinite_table(hidden=6, steps=200, budget=400)
        else:
            rows = products_table(1000, [1e2, 1e4, 1e6], [f64, torch.float32], 3000)
            print_products(rows, 3000)
            mlp = indefinite_table(hidden=32, steps=2000, budget=6000)
    finally:
        torch.set_num_threads(threads)
    return {"products": rows, "mlp": mlp}


if __name__ == "__main__":
    main()
