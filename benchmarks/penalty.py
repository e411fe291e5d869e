"""The penalty mode's accuracy against λ and steps, against the exact implicit hypergradient.

Problems (float64, set up by the examples' own builders): ``digits`` (examples/compare_modes.py:
softmax regression with 64 learned log weight decays) and ``cleaning`` (examples/
data_hypercleaning.py: 800 per-example weights, 40% corrupted labels, weak weight decay). The
inner problem is solved by the examples' L-BFGS; the reference is ``implicit-exact`` (a dense
Hessian solve) at those params.

1. λ × steps: relative error of ``mode="penalty"`` with exactly ``steps`` steps (tol=0), y's
   relative stationarity r, gradient evaluations per call; then each λ run to r ≤ 1e-6.
2. Inexact params: the error against the hypergradient at the true minimiser when params come
   from fewer L-BFGS iterations, for the penalty mode (which multiplies params' error by λ)
   and implicit-cg.
3. An online loop (digits): Adam on the decays, a few L-BFGS iterations on params between
   calls; steps per call to reach tol cold, warm-starting y itself, and warm-starting the
   offset y − z (what ``warm_start=True`` does).

    python benchmarks/penalty.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from bilevel import HyperGradient, HypergradientWarning
from bilevel.modes import Penalty

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# SGD with momentum 0.9 at the largest step (of 0.1, 0.5, 1, 2, 5) stable on each problem
LR = {"digits": 1.0, "cleaning": 5.0}


def example(name: str) -> ModuleType:
    """An example script imported by path (the examples are scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def digits_problem():
    """(inner, outer, solve(iters, start), hparams) of compare_modes.py at log decay −2."""
    cm = example("compare_modes")
    data = cm.load_data("cpu")
    inner, outer = cm.make_losses(data[0], data[1])
    phi = torch.full((64,), -2.0, dtype=torch.float64, requires_grad=True)
    return inner, outer, lambda iters=500, start=None: cm.solve_inner(inner, phi, start, iters), phi


def cleaning_problem():
    """The same for data_hypercleaning.py at weights σ(0) = ½."""
    hc = example("data_hypercleaning")
    train, val, _, _ = hc.make_data(0.4, "cpu")
    inner, outer = hc.make_losses(train, val)
    logits = torch.zeros(800, dtype=torch.float64, requires_grad=True)
    return inner, outer, lambda iters=300, start=None: hc.solve_inner(inner, logits, start, iters), logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def exact(inner, outer, params, phi) -> torch.Tensor:
    """The dense solve (least squares where Adam drove decays so low that H is near singular)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradientWarning)
        return HyperGradient("implicit-exact", max_params=1000).compute(inner, outer, params, phi)


def run(hg: HyperGradient, *args) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradientWarning)  # the table reports convergence
        out = hg.compute(*args)
    return out, time.perf_counter() - start


def sweep(name, problem, lams, steps_grid):
    inner, outer, solve, phi = problem
    params = solve()
    reference = exact(inner, outer, params, phi)
    rows = []
    for lam in lams:
        for steps in [*steps_grid, None]:  # None: run to r ≤ 1e-6
            options = {"steps": steps, "tol": 0.0} if steps else {"steps": 20000, "tol": 1e-6}
            hg = HyperGradient("penalty", penalty=lam, lr=LR[name], **options)
            got, seconds = run(hg, inner, outer, params, phi)
            s = hg.stats
            label = f"{steps}" if steps else f"{s.iters} (r≤1e-6)"
            rows.append(
                (name, lam, label, rel(got, reference), s.residual, s.extra["gradient_evaluations"], seconds)
            )
            print(
                f"{name:<9} {lam:>7g} {label:>15} {rows[-1][3]:10.2e} {s.residual:9.1e} "
                f"{rows[-1][5]:7d} {seconds * 1e3:8.0f}"
            )
    cg = HyperGradient("implicit-cg", iters=500, tol=1e-10)
    got, seconds = run(cg, inner, outer, params, phi)
    print(
        f"{name:<9} {'cg':>7} {cg.stats.iters:>15} {rel(got, reference):10.2e} {cg.stats.residual:9.1e} "
        f"{cg.stats.hvps:>5} HVPs {seconds * 1e3:6.0f}"
    )
    return rows


def inexact_params(name, problem, lams, iters_grid):
    """Error against the hypergradient at the true minimiser when params are inexact."""
    inner, outer, solve, phi = problem
    reference = exact(inner, outer, solve(), phi)
    rows = []
    for iters in iters_grid:
        params = solve(iters)
        grad = torch.autograd.grad(inner(params, phi.detach()), params)
        gnorm = float(torch.cat([g.flatten() for g in grad]).norm())
        cg_error = rel(
            run(HyperGradient("implicit-cg", iters=500, tol=1e-10), inner, outer, params, phi)[0], reference
        )
        errors, residuals = [], []
        for lam in lams:
            hg = HyperGradient("penalty", penalty=lam, lr=LR[name], steps=20000, tol=1e-6)
            errors.append(rel(run(hg, inner, outer, params, phi)[0], reference))
            residuals.append(hg.stats.extra["params_residual"])
        rows.append((name, iters, gnorm, cg_error, errors, residuals))
        cells = " ".join(f"{e:9.1e} ({r:7.1e})" for e, r in zip(errors, residuals))
        print(f"{name:<9} {iters:>6} {gnorm:9.1e} {cg_error:9.1e}  {cells}")
    return rows


class _WarmY(Penalty):
    """The alternative warm start, for comparison only: y₀ = the previous call's y itself."""

    _y = None

    def hypergradient(self, problem, stats):
        out = super().hypergradient(problem, stats)
        z = tuple(t.detach() for t in problem.theta0)
        self._y = tuple(zi - xi / self.penalty for zi, xi in zip(z, self._offset)) if self._offset else None
        return out

    def _start(self, z, lam):
        return self._y if self.warm_start else None


def online(outer_steps: int, lam: float, tol: float, inner_iters: int):
    """Steps per call to reach tol in an online loop, for three starts of y."""
    inner, outer, _, phi0 = digits_problem()
    results = {}
    for label, mode in (
        ("cold", Penalty(penalty=lam, tol=tol, steps=5000, optimizer_options={"lr": LR["digits"]})),
        (
            "warm y",
            _WarmY(penalty=lam, tol=tol, steps=5000, warm_start=True, optimizer_options={"lr": LR["digits"]}),
        ),
        (
            "warm offset",
            Penalty(
                penalty=lam, tol=tol, steps=5000, warm_start=True, optimizer_options={"lr": LR["digits"]}
            ),
        ),
    ):
        phi = phi0.detach().clone().requires_grad_()
        params = example("compare_modes").solve_inner(inner, phi)
        hg, opt = HyperGradient(mode), torch.optim.Adam([phi], lr=0.05)
        steps, errors = [], []
        for _ in range(outer_steps):
            opt.zero_grad()
            phi.grad, _ = run(hg, inner, outer, params, phi)
            steps.append(hg.stats.iters)
            errors.append(rel(phi.grad, exact(inner, outer, params, phi)))
            opt.step()
            params = example("compare_modes").solve_inner(inner, phi, start=params, iters=inner_iters)
        results[label] = (sum(steps[1:]) / max(len(steps) - 1, 1), sum(errors) / len(errors))
        print(f"{label:<12} {results[label][0]:10.1f} {results[label][1]:10.2e}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny grids (smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lams = [10.0, 1e2] if args.quick else [10.0, 1e2, 1e3, 1e4]
    steps_grid = [20] if args.quick else [50, 200, 1000]
    print(f"torch {torch.__version__}, float64, cpu; SGD(momentum=0.9) lr {LR}")
    print(f"\n{'problem':<9} {'λ':>7} {'steps':>15} {'rel. error':>10} {'r':>9} {'grads':>7} {'ms':>8}")
    problems = {"digits": digits_problem(), "cleaning": cleaning_problem()}
    rows = [row for name, problem in problems.items() for row in sweep(name, problem, lams, steps_grid)]
    print(
        f"\n{'problem':<9} {'L-BFGS':>6} {'‖∇θf‖':>9} {'cg error':>9}  "
        f"penalty error (λ‖∇θf‖/‖∇θg‖) for λ = {lams}"
    )
    iters_grid = [5, 20] if args.quick else [10, 30, 100]
    inexact = [
        row for name, problem in problems.items() for row in inexact_params(name, problem, lams, iters_grid)
    ]
    print(f"\nonline loop (digits, λ=100, tol=1e-4, 20 L-BFGS iters a step): {'steps/call':>10} {'error':>9}")
    loop = online(3 if args.quick else 30, 100.0, 1e-4, 20)
    return {"sweep": rows, "inexact": inexact, "online": loop}


if __name__ == "__main__":
    main()
