"""Time each mode against the same algorithm in torchopt, in higher and in plain torch.autograd.

Problems: a 3-layer tanh MLP (inputs 64, 10 classes, batch 2048, one log weight decay per
weight) at several widths, and a small CNN. Algorithms, each at a fixed budget so every
implementation does the same work:
  cg        20 conjugate-gradient iterations on (H + λI) x = ∂g/∂θ, then the mixed product
  neumann   20-term Neumann series with a fixed step (20 products: the last one gives the
            residual; "ours (no residual)" and torchopt make 19)
  unroll    20 differentiable SGD steps, backpropagated
Implementations: ours (HyperGradient), the floor (hand-written autograd: first-order graph
built once and reused for every product), torchopt (custom_root + solve_cg / solve_inv;
functional SGD), higher (differentiable SGD). Reports the median time per hypergradient,
peak CUDA memory, the ratio to the floor (the median of the ratios within a round, with a
95% confidence interval) and to the best peer, and the relative difference of the result
from the floor's.

    python benchmarks/bench.py [--device cuda] [--sizes 1e5,3e5] [--repeats 7] [--quick] [--compile]

``--compile`` adds ``ours (compiled)``: the same mode with ``compile=True`` (torch.compile
of the whole call; CUDA graphs on CUDA), compiled during the untimed warm-up.

Results and how to read them: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import time
import warnings
from collections.abc import Callable

import higher
import torch
import torch.nn.functional as F
import torchopt

from bilevel import HyperGradient

ITERS, STEPS, DAMPING, ALPHA, LR = 20, 20, 1.0, 0.05, 0.1


# ----------------------------------------------------------------------------- problems
def mlp_problem(
    params_target: float,
    device: str,
    batch: int = 2048,
    dtype: torch.dtype = torch.float32,
    log_decay: float = -4.0,
):
    """Width chosen so the MLP 64 -> H -> H -> 10 has about ``params_target`` parameters."""
    hidden = int((-(74) + (74**2 + 4 * params_target) ** 0.5) / 2)
    g = torch.Generator().manual_seed(0)
    shapes = [(hidden, 64), (hidden,), (hidden, hidden), (hidden,), (10, hidden), (10,)]
    params = tuple(
        (torch.randn(s, generator=g) / (s[-1] ** 0.5 if len(s) > 1 else 10)).to(device, dtype) for s in shapes
    )
    x, y = (
        torch.randn(batch, 64, generator=g).to(device, dtype),
        torch.randint(0, 10, (batch,), generator=g).to(device),
    )
    xv, yv = (
        torch.randn(512, 64, generator=g).to(device, dtype),
        torch.randint(0, 10, (512,), generator=g).to(device),
    )

    def forward(ps, inputs):
        h = torch.tanh(F.linear(inputs, ps[0], ps[1]))
        h = torch.tanh(F.linear(h, ps[2], ps[3]))
        return F.linear(h, ps[4], ps[5])

    return _losses(forward, params, x, y, xv, yv, f"MLP {sum(p.numel() for p in params):.1e}", log_decay)


def cnn_problem(device: str, batch: int = 512):
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32 * 4 * 4), (10,)]
    params = tuple((torch.randn(s, generator=g) * 0.1).to(device) for s in shapes)
    x, y = (
        torch.randn(batch, 1, 16, 16, generator=g).to(device),
        torch.randint(0, 10, (batch,), generator=g).to(device),
    )
    xv, yv = (
        torch.randn(256, 1, 16, 16, generator=g).to(device),
        torch.randint(0, 10, (256,), generator=g).to(device),
    )

    def forward(ps, inputs):
        h = torch.tanh(F.conv2d(inputs, ps[0], ps[1], padding=1))
        h = F.avg_pool2d(torch.tanh(F.conv2d(h, ps[2], ps[3], padding=1)), 4)
        return F.linear(h.flatten(1), ps[4], ps[5])

    # At this random point the CNN's Hessian has curvature below −DAMPING; a stronger weight
    # decay (e¹ on the diagonal) makes the CG system positive definite for every implementation.
    return _losses(forward, params, x, y, xv, yv, f"CNN {sum(p.numel() for p in params):.1e}", log_decay=1.0)


def _losses(forward, params, x, y, xv, yv, name, log_decay=-4.0):
    logs = tuple(torch.full_like(p, log_decay) for p in params)

    def inner(ps, ls):
        decay = sum((log_decay.exp() * p * p).sum() for log_decay, p in zip(ls, ps))
        return F.cross_entropy(forward(ps, x), y) + 0.5 * decay

    def outer(ps, ls):
        return F.cross_entropy(forward(ps, xv), yv)

    return name, inner, outer, params, logs


def leaves(tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


def dot(a, b):
    return sum((u * v).sum() for u, v in zip(a, b))


# ------------------------------------------------------------------- the floor (autograd)
def floor_implicit(solver: str):
    def run(inner, outer, params, logs):
        ps, ls = leaves(params), leaves(logs)
        field = torch.autograd.grad(inner(ps, ls), ps, create_graph=True)
        v = torch.autograd.grad(outer(ps, ls), ps)

        def hvp(u):
            return torch.autograd.grad(field, ps, u, retain_graph=True)

        if solver == "cg":
            x = [torch.zeros_like(t) for t in v]
            r = list(v)
            p = list(v)
            rs = dot(r, r)
            for _ in range(ITERS):
                ap = [a + DAMPING * b for a, b in zip(hvp(p), p)]
                step = rs / dot(p, ap)
                x = [xi + step * pi for xi, pi in zip(x, p)]
                r = [ri - step * ai for ri, ai in zip(r, ap)]
                rs_new = dot(r, r)
                p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
                rs = rs_new
        else:  # Neumann: α Σ_{j<K} (I − αH)^j v, K products (the last one gives the residual)
            term, total = list(v), list(v)
            for j in range(1, ITERS + 1):
                term = [t - ALPHA * h for t, h in zip(term, hvp(term))]
                if j < ITERS:
                    total = [a + t for a, t in zip(total, term)]
            x = [ALPHA * t for t in total]
        return tuple(-m for m in torch.autograd.grad(field, ls, x))

    return run


def floor_unroll(inner, outer, params, logs, steps=STEPS):
    ps, ls = leaves(params), leaves(logs)
    for _ in range(steps):
        grads = torch.autograd.grad(inner(ps, ls), ps, create_graph=True)
        ps = tuple(p - LR * g for p, g in zip(ps, grads))
    return torch.autograd.grad(outer(ps, ls), ls)


# ----------------------------------------------------------------------------- peers
def torchopt_implicit(solver: str):
    solve = (
        torchopt.linear_solve.solve_cg(maxiter=ITERS, ridge=DAMPING, rtol=0.0)
        if solver == "cg"
        else torchopt.linear_solve.solve_inv(ns=True, maxiter=ITERS - 1, alpha=ALPHA)
    )
    # torchopt's maxiter counts products after the first term: ITERS − 1 gives our ITERS terms
    # (ours spends one more product on the residual, which torchopt does not report, unless
    # residual=False: the row "ours (no residual)")

    def run(inner, outer, params, logs):
        def optimality(ps, ls):  # torchopt differentiates this with torch.func transforms
            return torch.func.grad(inner)(ps, ls)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solved(ps, ls):
            return ps  # already the inner solution for this benchmark

        ls = leaves(logs)
        ps = solved(leaves(params), ls)
        return torch.autograd.grad(outer(ps, ls), ls)

    return run


def torchopt_unroll(inner, outer, params, logs, steps=STEPS):
    ps, ls = leaves(params), leaves(logs)
    opt = torchopt.sgd(LR)
    state = opt.init(ps)
    for _ in range(steps):
        grads = torch.autograd.grad(inner(ps, ls), ps, create_graph=True)
        updates, state = opt.update(grads, state, inplace=False)
        ps = torchopt.apply_updates(ps, updates, inplace=False)
    return torch.autograd.grad(outer(ps, ls), ls)


def higher_unroll(inner, outer, params, logs, steps=STEPS):
    ps, ls = leaves(params), leaves(logs)
    diffopt = higher.optim.DifferentiableSGD(torch.optim.SGD(list(ps), lr=LR), list(ps))
    ps = list(ps)
    for _ in range(steps):
        ps = diffopt.step(inner(ps, ls), params=ps)
    return torch.autograd.grad(outer(ps, ls), ls)


def ours(mode: str, **options):
    """Our mode; with ``compile`` the first call also compiles (eager first call, then the
    compiled one), so the warm-up in :func:`measure` leaves it compiled."""
    hg = HyperGradient(mode, **options)
    warm = set()

    def run(inner, outer, params, logs):
        args = (inner, outer, leaves(params), leaves(logs))
        if options.get("compile") and id(inner) not in warm:
            warm.add(id(inner))
            hg.compute(*args)  # eager, with the input checks
            start = time.perf_counter()
            result = hg.compute(*args)  # compiles
            run.compile_seconds = time.perf_counter() - start
            return result
        return hg.compute(*args)

    run.hg = hg
    return run


COMPILED = {
    "cg": ("implicit-cg", {"iters": ITERS, "tol": 0.0, "damping": DAMPING}),
    "neumann": ("implicit-neumann", {"iters": ITERS, "alpha": ALPHA}),
    "unroll": ("unroll", {"steps": STEPS, "lr": LR}),
}


ALGORITHMS: dict[str, dict[str, Callable]] = {
    "cg": {
        "ours": ours("implicit-cg", iters=ITERS, tol=0.0, damping=DAMPING),
        "floor": floor_implicit("cg"),
        "torchopt": torchopt_implicit("cg"),
    },
    "neumann": {
        "ours": ours("implicit-neumann", iters=ITERS, alpha=ALPHA),
        # torchopt's work: the same 20 terms with 19 products, no residual
        "ours (no residual)": ours("implicit-neumann", iters=ITERS, alpha=ALPHA, residual=False),
        "floor": floor_implicit("neumann"),
        "torchopt": torchopt_implicit("neumann"),
    },
    "unroll": {
        "ours": ours("unroll", steps=STEPS, lr=LR),
        "ours (higher)": ours("unroll", steps=STEPS, lr=LR, backend="higher"),
        "floor": floor_unroll,
        "torchopt": torchopt_unroll,
        "higher": higher_unroll,
    },
}
PEERS = ("torchopt", "higher")


def measure(implementations: dict[str, Callable], problem, repeats: int, device: str):
    """Per implementation: median seconds, peak CUDA memory, result, and the seconds of each
    round. Repeats are interleaved (one call of each implementation per round), so a change
    in machine load between rounds affects every implementation alike; each round starts with
    the next implementation, so an effect of the position in a round (allocator and cache
    state left by the previous call) does not always fall on the same one."""
    _, inner, outer, params, logs = problem
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results, memory, times = {}, {}, {name: [] for name in implementations}
    for name, fn in implementations.items():  # warm-up, result and peak memory, one at a time
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        results[name] = fn(inner, outer, params, logs)
        sync()
        memory[name] = torch.cuda.max_memory_allocated() if cuda else None
    names = list(implementations)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            fn = implementations[name]
            start = time.perf_counter()
            fn(inner, outer, params, logs)
            sync()
            times[name].append(time.perf_counter() - start)
    return {
        name: (statistics.median(times[name]), memory[name], results[name], times[name])
        for name in implementations
    }


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """The median over rounds of ``times / reference`` in the same round: a load change that
    spans a round slows both alike and cancels, which the ratio of two medians does not."""
    return statistics.median(t / r for t, r in zip(times, reference))


def ratio_interval(times: list[float], reference: list[float]) -> tuple[float, float]:
    """A distribution-free confidence interval of at least 95% for :func:`paired_ratio`: the
    k-th smallest and largest per-round ratio, with the largest k for which the median lies
    between them with probability ≥ 0.95 (binomial; below 6 rounds, the min and the max)."""
    ratios = sorted(t / r for t, r in zip(times, reference))
    n, k = len(ratios), 0
    below = 1 / 2**n  # P(Binomial(n, ½) ≤ k): the median lies outside with twice that
    while 1 - 2 * (below + math.comb(n, k + 1) / 2**n) >= 0.95:
        k += 1
        below += math.comb(n, k) / 2**n
    return ratios[k], ratios[-1 - k]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=None, help="MLP parameter counts, e.g. 1e5,3e5,4e6")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-cnn", action="store_true")
    parser.add_argument("--algorithms", default="cg,neumann,unroll")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time our modes with compile=True (compiled once per problem, untimed)",
    )
    args = parser.parse_args(argv)
    default_sizes = "1e5,3e5,1e6,4e6,1e7" if args.device.startswith("cuda") else "1e5"
    sizes = [float(s) for s in (args.sizes or default_sizes).split(",")]
    batch = 2048
    if args.quick:  # a smoke test of every implementation (tests/test_benchmarks.py)
        sizes, args.repeats, batch = [2e3], 1, 64
    problems = [mlp_problem(s, args.device, batch) for s in sizes]
    if not args.no_cnn:
        problems.append(
            cnn_problem(args.device, batch=512 if args.device.startswith("cuda") else min(batch, 64))
        )
    print(
        f"torch {torch.__version__}, torchopt {torchopt.__version__}, "
        f"higher {importlib.metadata.version('higher')}, "
        f"device {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, "
        f"threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    print(
        f"{'problem':<12} {'algorithm':<8} {'implementation':<19} {'ms':>9} {'/floor':>7} {'95% CI':>12} "
        f"{'/best peer':>10} {'MiB':>8} {'diff vs floor':>13}"
    )
    rows = []
    warnings.simplefilter("ignore")
    for problem in problems:
        for algorithm in args.algorithms.split(","):
            implementations = dict(ALGORITHMS[algorithm])
            if args.compile:
                mode, options = COMPILED[algorithm]
                implementations["ours (compiled)"] = ours(mode, compile=True, **options)
            results = measure(implementations, problem, args.repeats, args.device)
            compiled = implementations.get("ours (compiled)")
            if compiled is not None and not compiled.hg.stats.extra.get("compiled"):
                results["ours (NOT compiled)"] = results.pop("ours (compiled)")
                print(
                    f"{problem[0]:<12} {algorithm:<8} not compiled: {compiled.hg.mode._fast.failure}",
                    flush=True,
                )
            elif compiled is not None:
                print(
                    f"{problem[0]:<12} {algorithm:<8} compile took {compiled.compile_seconds:.0f} s",
                    flush=True,
                )
            _, _, floor_result, floor_rounds = results["floor"]
            peers = [p for p in PEERS if p in results]
            best = min(peers, key=lambda p: results[p][0]) if peers else None
            for name, (seconds, memory, result, rounds) in results.items():
                diff = max(float((a - b).norm() / b.norm()) for a, b in zip(result, floor_result))
                to_floor, (low, high) = (
                    paired_ratio(rounds, floor_rounds),
                    ratio_interval(rounds, floor_rounds),
                )
                to_peer = paired_ratio(rounds, results[best][3]) if best else float("nan")
                mib = f"{memory / 2**20:8.0f}" if memory is not None else f"{'n/a':>8}"
                print(
                    f"{problem[0]:<12} {algorithm:<8} {name:<19} {seconds * 1e3:9.1f} {to_floor:7.2f} "
                    f"{f'{low:.2f}–{high:.2f}':>12} {to_peer:10.2f} {mib} {diff:13.1e}",
                    flush=True,
                )
                rows.append(
                    (problem[0], algorithm, name, seconds, to_floor, to_peer, memory, diff, (low, high))
                )
    return rows


if __name__ == "__main__":
    main()
