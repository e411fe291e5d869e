"""Finite-difference Hessian products (``hvp="finite-difference"``) against autograd products.

(a) Accuracy. Each implicit solver at the benchmark's budget (20 CG iterations on
``(H + I) x = ∂g/∂θ`` / 20 Neumann terms with step 0.05, as in bench.py) runs with
finite-difference products over a range of relative steps ``fd_eps`` (1e-1 … 1e-8 and the
default ∛ε), in float32 and float64, and is compared with the same solver with autograd
products in the same dtype: the relative error ‖fd − autograd‖ / ‖autograd‖ of the
hypergradient. Problems: bench.py's MLP (tanh, one log weight decay per weight), softmax
regression (convex, smooth) and ridge regression (quadratic: the central difference is exact
but for rounding, so its error is the rounding term alone). A ``*`` marks a cell whose solve
broke down (``stats.breakdown``, e.g. negative curvature from a noisy product).

(b) Cost per call on bench.py's MLP and CNN, float32: Hessian products, first-order gradient
evaluations, median wall time (repeats interleaved as in bench.py), and peak memory, each
of autograd and finite-difference products. Memory is measured two ways, both on CPU:
``saved MiB``, the peak of what autograd graphs keep alive (``bilevel.memory.
SavedTensorMemory``: tensors saved for backward, each storage once); and ``alloc MiB``, the
peak of the CPU allocator above its level at the start of the call, from the allocation and
free events of ``torch.profiler`` (``profile_memory=True``), which also counts gradients,
solver vectors and temporaries. Three reference rows give what a call needs at least: one
first-order gradient evaluation of the inner loss (the finite-difference products' graph),
the graph of ``∇θ f`` built with ``create_graph=True`` (the autograd products' graph), and
the graph of the outer gradient (both rules take it; on the CNN, whose validation batch is
larger than its training batch, it sets the peak). On CUDA the
``alloc MiB`` column is ``torch.cuda.max_memory_allocated`` instead.

    python benchmarks/first_order.py [--size 2e4] [--cost-size 1e5] [--repeats 5] [--quick]
    python benchmarks/first_order.py --no-accuracy --repeats 7     # the cost table only

``--quick`` (the smoke test in tests/test_benchmarks.py) runs the MLP alone at 2e3 parameters,
two steps and one repeat. Kineto prints two lines per profiled call on stderr.
Results and how to read them: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from bench import ALPHA, DAMPING, ITERS, _losses, cnn_problem, leaves, measure, mlp_problem, ours
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from bilevel import HyperGradient
from bilevel.memory import SavedTensorMemory

MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "cg": ("implicit-cg", {"iters": ITERS, "tol": 0.0, "damping": DAMPING}),
    "neumann": ("implicit-neumann", {"iters": ITERS, "alpha": ALPHA}),
}
STEPS: tuple[float | None, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, None)  # None: ∛ε
FD = "finite-difference"

Problem = tuple[str, Callable, Callable, tuple[Tensor, ...], tuple[Tensor, ...]]


@dataclass
class AccuracyRow:
    problem: str
    algorithm: str
    dtype: str
    fd_eps: float  # the relative step used (the default's value where ``default``)
    default: bool
    error: float  # ‖fd − autograd‖ / ‖autograd‖, same solver and dtype
    breakdown: str | None


@dataclass
class CostRow:
    problem: str
    algorithm: str
    hvp: str  # "autograd", "finite-difference", or a reference graph ("graph: ...")
    products: int
    evaluations: int | None  # first-order gradient evaluations (finite differences only)
    seconds: float
    to_autograd: float  # paired ratio of times to the autograd products'
    saved: int  # peak bytes saved for backward
    allocated: int | None  # peak allocator bytes above the start of the call
    diff: float  # relative difference from the autograd products' result


# ----------------------------------------------------------------------------- problems
def logistic_problem(dtype: torch.dtype, features: int = 32, classes: int = 10) -> Problem:
    """Softmax regression with one log weight decay per weight (convex, smooth)."""
    g = torch.Generator().manual_seed(1)
    params = (
        (torch.randn(classes, features, generator=g) / features**0.5).to(dtype),
        torch.zeros(classes, dtype=dtype),
    )
    x, xv = (torch.randn(n, features, generator=g).to(dtype) for n in (1024, 256))
    y, yv = (torch.randint(0, classes, (n,), generator=g) for n in (1024, 256))

    def forward(ps: tuple[Tensor, ...], inputs: Tensor) -> Tensor:
        return F.linear(inputs, ps[0], ps[1])

    return _losses(forward, params, x, y, xv, yv, "logistic", log_decay=-2.0)


def ridge_problem(dtype: torch.dtype, features: int = 64) -> Problem:
    """Least squares with one log weight decay per weight: a quadratic inner loss."""
    g = torch.Generator().manual_seed(2)
    x, xv = (torch.randn(n, features, generator=g).to(dtype) for n in (512, 256))
    w_true = torch.randn(features, 1, generator=g).to(dtype)
    y, yv = x @ w_true + torch.randn(512, 1, generator=g).to(dtype), xv @ w_true
    params = (torch.randn(features, 1, generator=g).to(dtype),)
    logs = (torch.full((features, 1), -2.0, dtype=dtype),)

    def inner(ps: tuple[Tensor, ...], ls: tuple[Tensor, ...]) -> Tensor:
        return F.mse_loss(x @ ps[0], y) + 0.5 * (ls[0].exp() * ps[0] ** 2).sum()

    def outer(ps: tuple[Tensor, ...], ls: tuple[Tensor, ...]) -> Tensor:
        return F.mse_loss(xv @ ps[0], yv)

    return "ridge", inner, outer, params, logs


def flat(tensors: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def relative(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> float:
    fa, fb = flat(a), flat(b)
    return float((fa - fb).norm() / fb.norm())


# ----------------------------------------------------------------------------- (a) accuracy
def accuracy(
    problems: list[Problem], dtype: torch.dtype, steps: tuple[float | None, ...]
) -> list[AccuracyRow]:
    rows = []
    for name, inner, outer, params, logs in problems:
        for algorithm, (mode, options) in MODES.items():
            reference = HyperGradient(mode, **options).compute(inner, outer, leaves(params), leaves(logs))
            for step in steps:
                if step is not None and step <= torch.finfo(dtype).eps:  # refused: below rounding
                    rows.append(
                        AccuracyRow(
                            name,
                            algorithm,
                            str(dtype).removeprefix("torch."),
                            step,
                            False,
                            math.nan,
                            "refused",
                        )
                    )
                    continue
                hg = HyperGradient(mode, hvp=FD, fd_eps=step, **options)
                result = hg.compute(inner, outer, leaves(params), leaves(logs))
                rows.append(
                    AccuracyRow(
                        name,
                        algorithm,
                        str(dtype).removeprefix("torch."),
                        float(hg.stats.extra["fd_eps"]),
                        step is None,
                        relative(result, reference),
                        hg.stats.breakdown,
                    )
                )
    return rows


def print_accuracy(rows: list[AccuracyRow], steps: tuple[float | None, ...]) -> None:
    labels = [f"{s:.0e}" if s is not None else "∛ε" for s in steps]
    print(f"{'problem':<12} {'algorithm':<8} {'dtype':<8} " + " ".join(f"{label:>8}" for label in labels))
    for start in range(0, len(rows), len(steps)):
        line = rows[start : start + len(steps)]
        cells = " ".join(f"{r.error:7.1e}{'*' if r.breakdown else ' '}" for r in line)
        print(f"{line[0].problem:<12} {line[0].algorithm:<8} {line[0].dtype:<8} {cells}", flush=True)


# ----------------------------------------------------------------------------- (b) cost
def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of the CPU allocator above its level when ``fn`` starts, from the
    profiler's allocation/free events in the order they happened."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch._C._autograd.DeviceType.CPU:  # not CUDA events
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def saved_peak(fn: Callable[[], object]) -> int:
    with SavedTensorMemory() as meter:
        fn()
    return meter.peak


def reference_graphs(problem: Problem) -> dict[str, Callable[[], object]]:
    """What each product rule keeps at least: one gradient evaluation's graph (freed by its
    backward), or the graph of ∇θ f that every autograd product reuses."""
    _, inner, outer, params, logs = problem

    def first_order() -> object:
        ps = leaves(params)
        return torch.autograd.grad(inner(ps, logs), ps)

    def second_order() -> object:
        ps = leaves(params)
        field = torch.autograd.grad(inner(ps, logs), ps, create_graph=True)
        return torch.autograd.grad(field, ps, [torch.ones_like(p) for p in ps])  # one product

    def outer_gradient() -> object:
        ps = leaves(params)
        return torch.autograd.grad(outer(ps, logs), ps)

    return {
        "graph: one gradient": first_order,
        "graph: ∇θ f, create_graph": second_order,
        "graph: outer gradient": outer_gradient,
    }


def cost(problem: Problem, repeats: int, device: str) -> list[CostRow]:
    name, inner, outer, params, logs = problem
    rows = []
    for algorithm, (mode, options) in MODES.items():
        implementations = {"autograd": ours(mode, **options), FD: ours(mode, hvp=FD, **options)}
        results = measure(implementations, problem, repeats, device)
        _, _, reference, reference_rounds = results["autograd"]
        for hvp, run in implementations.items():
            seconds, cuda_peak, result, rounds = results[hvp]
            call = lambda run=run: run(inner, outer, params, logs)
            stats = run.hg.stats
            rows.append(
                CostRow(
                    name,
                    algorithm,
                    hvp,
                    stats.hvps,
                    stats.extra.get("gradient_evaluations"),
                    seconds,
                    statistics.median(t / r for t, r in zip(rounds, reference_rounds)),
                    saved_peak(call),
                    cuda_peak if device.startswith("cuda") else allocator_peak(call),
                    relative(result, reference),
                )
            )
    for label, fn in reference_graphs(problem).items():
        rows.append(CostRow(name, "-", label, 0, None, float("nan"), float("nan"), saved_peak(fn), None, 0.0))
    return rows


def print_cost(rows: list[CostRow]) -> None:
    print(
        f"{'problem':<12} {'algorithm':<8} {'products':<26} {'hvps':>4} {'grads':>5} {'ms':>8} "
        f"{'/autograd':>9} {'saved MiB':>9} {'alloc MiB':>9} {'diff':>8}"
    )
    for r in rows:
        grads = f"{r.evaluations:5d}" if r.evaluations is not None else f"{'-':>5}"
        alloc = f"{r.allocated / 2**20:9.1f}" if r.allocated is not None else f"{'-':>9}"
        timing = (
            f"{r.seconds * 1e3:8.1f} {r.to_autograd:9.2f}" if r.seconds == r.seconds else f"{'-':>8} {'-':>9}"
        )
        print(
            f"{r.problem:<12} {r.algorithm:<8} {r.hvp:<26} {r.products:4d} {grads} {timing} "
            f"{r.saved / 2**20:9.1f} {alloc} {r.diff:8.1e}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> list[AccuracyRow | CostRow]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="for the cost tables (accuracy runs on the CPU)")
    parser.add_argument("--size", type=float, default=2e4, help="MLP parameters in the accuracy tables")
    parser.add_argument("--cost-size", type=float, default=1e5, help="MLP parameters in the cost table")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cnn-batch", type=int, default=64, help="bench.py's on CPU (512 on CUDA)")
    parser.add_argument("--no-accuracy", action="store_true", help="the cost table (b) only")
    parser.add_argument("--no-cost", action="store_true", help="the accuracy tables (a) only")
    parser.add_argument("--quick", action="store_true", help="a smoke test (tests/test_benchmarks.py)")
    args = parser.parse_args(argv)
    steps, batch = STEPS, 2048
    if args.quick:
        steps, args.size, args.cost_size, args.repeats, batch = (1e-4, None), 2e3, 2e3, 1, 64
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, solvers at the benchmark budget "
        f"(cg: {ITERS} iterations, damping {DAMPING}; neumann: {ITERS} terms, step {ALPHA})"
    )
    warnings.simplefilter("ignore")  # breakdowns are marked in the table
    rows: list[AccuracyRow | CostRow] = []
    if not args.no_accuracy:
        print("\n(a) relative error of finite-difference products against autograd products, by fd_eps")
    for dtype in () if args.no_accuracy else (torch.float32, torch.float64):
        problems = [mlp_problem(args.size, "cpu", batch, dtype=dtype)]
        if not args.quick:
            problems += [logistic_problem(dtype), ridge_problem(dtype)]
        found = accuracy(problems, dtype, steps)
        print_accuracy(found, steps)
        rows.extend(found)
    if not args.no_cost:
        print(f"\n(b) cost per call, float32, median of {args.repeats}")
        cost_problems = [mlp_problem(args.cost_size, args.device, batch)]
        if not args.quick:
            cost_problems.append(cnn_problem(args.device, batch=args.cnn_batch))
        found_cost: list[CostRow] = []
        for problem in cost_problems:
            found_cost.extend(cost(problem, args.repeats, args.device))
        print_cost(found_cost)
        rows.extend(found_cost)
    return rows


if __name__ == "__main__":
    main()
