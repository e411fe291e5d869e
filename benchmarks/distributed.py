"""Data-parallel hypergradients (``distributed=True``): what a call costs in collectives, bytes,
Hessian products and time at W = 1 and W = 2 gloo processes, the error of ``local_solves=True``,
and a cost model of the collectives for W GPUs on NCCL.

(a) Cost per call. Problem: a tanh MLP (16 → 64 → 32 → 1, 3,201 parameters; ``--quick``: 16
→ 16 → 1), float64, regression on 2048 training and 1024 validation rows (synthetic, fixed
seed), one log weight decay per layer, θ at the full-batch minimiser (L-BFGS in the parent
process, so every rank starts from the same bits). Each rank holds 1/W of the rows and its
closures return the mean over them. Every mode runs at a fixed budget (``tol=0`` where the
mode has one), so W = 1 and W = 2 do the same work. Per call: collectives
(``stats.extra["collectives"]``), bytes all-reduced or gathered per rank
(``collective_bytes``), Hessian products (``stats.hvps``), and the median wall time over
``--repeats`` calls (each call's time is the slowest rank's). At W = 1 the same mode with
``distributed=False`` runs interleaved with it, round by round, and ``/ local`` is the paired
ratio (the median over rounds of the ratio within a round): what the agreement and the
all-reduces cost on a one-process group. At W = 2, ``diff W=1`` is the relative difference of
the hypergradient from W = 1's (summation order only), and the ranks' results are checked to
be bit-identical. ``implicit-exact`` is left out: it takes P = 3,201 products (one per
column), each an all-reduce, and adds nothing the CG rows do not show.

(b) ``local_solves=True`` (each rank solves its own shard's system, the results averaged:
Betty's and SAMA's approach) against the exact data-parallel result on the same problem, CG
converged (tol 1e-10): relative error and cosine, for each W of ``--worlds``, and how the
ranks' own solves ended (θ* minimises the global loss, not a shard's: a shard's Hessian there
need not be positive definite, and CG on it can meet negative curvature).

(c) Cost model. A ring all-reduce of P floats of b bytes on W GPUs costs about
``2(W−1)/W · P·b / bandwidth + 2(W−1)·latency``. Each Hessian product of a distributed call is
one all-reduce of P floats (θ's size: the cotangent of the synchronized θ), so the table gives
that time against one product's own time: the CPU product measured in (a), and the H100 product
times measured in benchmarks/README.md ("Product forms": 2.25 ms at 3.0e5 and 3.35 ms at 4.3e6
parameters, batch 2048 per GPU, float32). Bandwidth and latency are assumed (``--bandwidth``,
``--latency``; defaults: 350 GB/s NCCL bus bandwidth within an NVLink node, 50 GB/s across
nodes over 400 Gb/s InfiniBand, 3 µs per ring step) and labelled as such.

    python benchmarks/distributed.py [--repeats 7] [--worlds 2,4] [--quick]

Results and how to read them: benchmarks/README.md, "Distributed (data-parallel) hypergradients".
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from parallel import run_ranks  # the tests' spawn harness, with its hard timeout

import bilevel
from bilevel import HyperGradient

#: (label, mode, options): fixed budgets, so that every W does the same work
MODES: list[tuple[str, str, dict[str, Any]]] = [
    ("implicit-cg", "implicit-cg", {"iters": 30, "tol": 0.0}),
    ("implicit-cg (fd products)", "implicit-cg", {"iters": 30, "tol": 0.0, "hvp": "finite-difference"}),
    ("implicit-minres", "implicit-minres", {"iters": 30, "tol": 0.0}),
    ("implicit-gmres", "implicit-gmres", {"iters": 30, "tol": 0.0}),
    ("implicit-neumann", "implicit-neumann", {"iters": 30, "alpha": 0.05}),
    ("implicit-nystrom", "implicit-nystrom", {"rank": 20, "generator": 0}),
    ("implicit-identity", "implicit-identity", {}),
    ("penalty", "penalty", {"steps": 30, "tol": 0.0}),
    ("unroll", "unroll", {"steps": 10, "lr": 0.05}),
    ("truncated-unroll", "truncated-unroll", {"steps": 10, "truncate": 4, "lr": 0.05}),
]
QUICK_MODES = ["implicit-cg", "implicit-neumann", "unroll"]
CONVERGED = {"iters": 500, "tol": 1e-10}  # (b): CG to the tolerance, exact and local solves
N_TRAIN, N_VAL, FEATURES = 2048, 1024, 16  # rows divisible by 1, 2, 4, 8
#: H100 product times measured in benchmarks/README.md, "Product forms" (params, seconds)
H100_PRODUCTS = [(3.0e5, 2.25e-3), (4.3e6, 3.35e-3)]


# ----------------------------------------------------------------------------- the problem
def sizes(quick: bool) -> list[int]:
    return [FEATURES, 16, 1] if quick else [FEATURES, 64, 32, 1]


def data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(FEATURES, 8, generator=g, dtype=torch.float64)
    out = []
    for n in (N_TRAIN, N_VAL):
        x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
        y = torch.tanh(x @ teacher).sum(1) / 8**0.5 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        out += [x, y]
    return tuple(out)


def init_params(layers: list[int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    params = []
    for fan_in, fan_out in itertools.pairwise(layers):
        params.append(torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64) / fan_in**0.5)
        params.append(torch.zeros(fan_out, dtype=torch.float64))
    return tuple(params)


def forward(params: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    layers = len(params) // 2
    for i in range(layers):
        x = F.linear(x, params[2 * i], params[2 * i + 1])
        if i < layers - 1:
            x = torch.tanh(x)
    return x.squeeze(-1)


def losses(x, y, xv, yv):
    def inner(params, log_decay):
        decay = sum(log_decay[i].exp() * params[2 * i].pow(2).sum() for i in range(len(log_decay)))
        return F.mse_loss(forward(params, x), y) + 0.5 * decay

    def outer(params, log_decay):
        return F.mse_loss(forward(params, xv), yv)

    return inner, outer


def minimiser(layers: list[int], log_decay: torch.Tensor) -> tuple[np.ndarray, ...]:
    """θ* of the full-batch inner problem (L-BFGS, float64), as arrays to send to the ranks."""
    inner, _ = losses(*data())
    params = [p.clone().requires_grad_() for p in init_params(layers)]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=2000, tolerance_grad=1e-11, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner(tuple(params), log_decay)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return tuple(p.detach().numpy() for p in params)


def shard(tensors, rank: int, world: int):
    return tuple(t.chunk(world)[rank] for t in tensors)


# ----------------------------------------------------------------------------- on each rank
def call_costs(rank: int, world: int, theta: tuple, log_decay: np.ndarray, modes: list, repeats: int) -> dict:
    """Every mode's counts, per-call times and result on this rank (and, at W = 1, the same
    mode with ``distributed=False``, interleaved); the time of a bare all-reduce of the
    products' payload."""
    import torch.distributed as dist

    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    inner, outer = losses(*shard(data(), rank, world))
    params = tuple(torch.from_numpy(p).requires_grad_() for p in theta)
    phi = torch.from_numpy(log_decay).requires_grad_()
    report: dict[str, Any] = {"modes": {}}
    for name, mode, options in modes:
        hgs = {"dist": HyperGradient(mode, distributed=True, **options)}
        if world == 1:
            hgs["local"] = HyperGradient(mode, distributed=False, **options)
        times: dict[str, list[float]] = {k: [] for k in hgs}
        grads = {}
        order = list(hgs)
        for round_ in range(repeats + 1):  # round 0: warm-up
            for key in order[round_ % len(order) :] + order[: round_ % len(order)]:
                dist.barrier()
                start = time.perf_counter()
                grads[key] = hgs[key].compute(inner, outer, params, phi)
                if round_:
                    times[key].append(time.perf_counter() - start)
        stats = hgs["dist"].stats
        report["modes"][name] = {
            "collectives": stats.extra["collectives"],
            "bytes": stats.extra["collective_bytes"],
            "hvps": stats.hvps,
            "residual": stats.residual,
            "times": times,
            "grad": grads["dist"].numpy(),
        }
    payload = torch.zeros(sum(p.numel() for p in params) + len(params) + 1 + world, dtype=torch.float64)
    for _ in range(5):
        dist.all_reduce(payload)
    spans = []
    for _ in range(50):
        start = time.perf_counter()
        dist.all_reduce(payload)
        spans.append(time.perf_counter() - start)
    report["all_reduce"] = statistics.median(spans)
    return report


def local_solves_error(rank: int, world: int, theta: tuple, log_decay: np.ndarray) -> dict:
    """(b): the exact data-parallel hypergradient and the mean of local solves, CG converged."""
    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    inner, outer = losses(*shard(data(), rank, world))
    params = tuple(torch.from_numpy(p).requires_grad_() for p in theta)
    phi = torch.from_numpy(log_decay).requires_grad_()
    out = {}
    for key, local in (("exact", False), ("local", True)):
        hg = HyperGradient("implicit-cg", distributed=True, local_solves=local, **CONVERGED)
        out[key] = hg.compute(inner, outer, params, phi).numpy()
        out[key + "_stats"] = (
            hg.stats.extra["collectives"],
            hg.stats.extra["collective_bytes"],
            hg.stats.hvps,
        )
        out[key + "_breakdown"] = hg.stats.breakdown  # with local solves: this rank's own solve
    return out


# ----------------------------------------------------------------------------- tables
def paired_ratio(times: list[float], reference: list[float]) -> float:
    return statistics.median(t / r for t, r in zip(times, reference))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ring_all_reduce(floats: float, nbytes: int, world: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce of ``floats`` values of ``nbytes`` each on ``world`` GPUs."""
    return 2 * (world - 1) / world * floats * nbytes / bandwidth + 2 * (world - 1) * latency


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worlds", default="2,4", help="W for the local_solves error table")
    parser.add_argument("--bandwidth", default="350e9,50e9", help="assumed NCCL bus bandwidths, B/s")
    parser.add_argument("--latency", type=float, default=3e-6, help="assumed latency per ring step, s")
    parser.add_argument("--timeout", type=float, default=600, help="per spawn of ranks, s")
    parser.add_argument("--quick", action="store_true", help="a small MLP, three modes, one repeat")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    worlds = [2] if args.quick else [int(w) for w in args.worlds.split(",")]
    modes = [m for m in MODES if m[0] in QUICK_MODES] if args.quick else MODES
    layers = sizes(args.quick)

    log_decay = np.full(len(layers) - 1, -3.0)
    theta = minimiser(layers, torch.from_numpy(log_decay))
    n_params = sum(p.size for p in theta)
    print(
        f"MLP {' → '.join(map(str, layers))}: {n_params} parameters, {len(log_decay)} hparams, float64; "
        f"{N_TRAIN} training and {N_VAL} validation rows; torch {torch.__version__}, gloo on 127.0.0.1, "
        f"one thread per rank; median of {repeats}\n"
    )

    runs = {
        w: run_ranks(call_costs, w, theta, log_decay, modes, repeats, timeout=args.timeout) for w in (1, 2)
    }
    print(
        "| mode | W | collectives / call | KiB / call | products / call | collectives − products "
        "| residual | ms / call | / local (W=1) | W=2 / W=1 | diff W=1 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for name, _, _ in modes:
        base = runs[1][0]["modes"][name]
        base_ms = statistics.median(base["times"]["dist"])
        for w, ranks in runs.items():
            r = ranks[0]["modes"][name]
            per_call = [max(rk["modes"][name]["times"]["dist"][i] for rk in ranks) for i in range(repeats)]
            ms = statistics.median(per_call)
            identical = all(np.array_equal(rk["modes"][name]["grad"], r["grad"]) for rk in ranks)
            if not identical:
                raise AssertionError(f"{name}: the ranks' hypergradients differ at W = {w}")
            row = {
                "mode": name,
                "world": w,
                "collectives": r["collectives"],
                "bytes": r["bytes"],
                "hvps": r["hvps"],
                "seconds": ms,
                "to_local": paired_ratio(r["times"]["dist"], r["times"]["local"]) if w == 1 else math.nan,
                "to_w1": ms / base_ms,
                "diff": rel(r["grad"], base["grad"]),
            }
            rows.append(row)
            residual = "" if r["residual"] is None else f"{r['residual']:.1e}"
            print(
                f"| {name if w == 1 else ''} | {w} | {row['collectives']} | {row['bytes'] / 1024:.1f} | "
                f"{row['hvps']} | {row['collectives'] - row['hvps']} | "
                f"{residual} | {ms * 1e3:.1f} | "
                + (
                    f"{row['to_local']:.2f} | | |"
                    if w == 1
                    else f" | {row['to_w1']:.2f} | {row['diff']:.1e} |"
                )
            )
    gloo = {w: runs[w][0]["all_reduce"] for w in runs}
    print(
        f"\nbare gloo all-reduce of the products' payload ({n_params} float64 + flags): "
        + ", ".join(f"W={w}: {t * 1e6:.0f} µs" for w, t in gloo.items())
    )

    print("\n`local_solves=True` against the exact data-parallel hypergradient (CG to tol 1e-10):\n")
    print(
        "| W | rows per rank | relative error | cosine | collectives exact / local "
        "| products exact / local | the ranks' local solves |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    local_rows = []
    for w in worlds:
        ranks = run_ranks(local_solves_error, w, theta, log_decay, timeout=args.timeout)
        r = ranks[0]
        assert all(np.array_equal(rk["local"], r["local"]) for rk in ranks)
        broke = sorted({str(rk["local_breakdown"]) for rk in ranks})
        error = rel(r["local"], r["exact"])
        cosine = float(r["local"] @ r["exact"] / (np.linalg.norm(r["local"]) * np.linalg.norm(r["exact"])))
        local_rows.append({"world": w, "error": error, "cosine": cosine, "local_breakdown": broke})
        (ce, _, he), (cl, _, hl) = r["exact_stats"], r["local_stats"]
        print(
            f"| {w} | {N_TRAIN // w} | {error:.2e} | {cosine:.5f} | {ce} / {cl} | {he} / {hl} "
            f"| {', '.join(broke)} |"
        )

    cg = next(row for row in rows if row["mode"] == "implicit-cg" and row["world"] == 1)
    cpu_product = statistics.median(runs[1][0]["modes"]["implicit-cg"]["times"]["local"]) / cg["hvps"]
    bandwidths = [float(b) for b in args.bandwidth.split(",")]
    products = [(n_params, cpu_product, "CPU, measured (a), float64", 8)] + [
        (p, t, "H100, measured (README)", 4) for p, t in H100_PRODUCTS
    ]
    print(
        "\nCost model: one ring all-reduce per product, modelled, against the product's own time "
        f"(latency {args.latency * 1e6:.0f} µs per step, assumed):\n"
    )
    head = " | ".join(f"all-reduce µs @ {b / 1e9:.0f} GB/s | / product" for b in bandwidths)
    print(f"| params | product | product ms | W | {head} |")
    print("| ---: | --- | ---: | ---: |" + " ---: | ---: |" * len(bandwidths))
    model_rows = []
    for p, t, source, nbytes in products:
        for w in (2, 4, 8):
            cells = []
            for b in bandwidths:
                comm = ring_all_reduce(p, nbytes, w, b, args.latency)
                cells.append(f"{comm * 1e6:.0f} | {comm / t:.3f}")
                model_rows.append(
                    {"params": p, "world": w, "bandwidth": b, "seconds": comm, "ratio": comm / t}
                )
            print(f"| {p:.1e} | {source} | {t * 1e3:.2f} | {w} | " + " | ".join(cells) + " |")
    return {"rows": rows, "local_solves": local_rows, "model": model_rows, "gloo": gloo}


if __name__ == "__main__":
    main()
