"""Unrolled hypergradients in bounded memory: graph memory and time of ``checkpoint="auto"``
and of ``direction="forward"`` against the plain unroll, higher and torchopt.

Problems: bench.py's MLP (64 -> H -> H -> 10, one log weight decay per weight) and CNN, at
small widths and batches so that T = 500 runs on a few CPU cores, both with log decays −4
(bench.py gives the CNN e¹ for its CG system; over hundreds of steps that decay shrinks the
weights, and the hypergradient, to zero); SGD with lr 0.1 for T steps. Implementations:
  ours           unroll (torchopt backend)
  ours (ckpt)    unroll with checkpoint="auto": k ≈ √T steps per segment
  torchopt       torchopt functional SGD, its own unrolled loop (bench.torchopt_unroll)
  higher         higher DifferentiableSGD, its own unrolled loop (bench.higher_unroll)
  ours (fwd, 1)  direction="forward" with one scalar log decay shared by every weight, and
  ours (1)       the plain unroll of that problem, its reference
Columns: the median time over interleaved rounds and its ratio to the plain unroll of the
same problem (median of per-round ratios: the recomputation overhead for "ckpt"), and the
ratio of the fastest rounds ("min": on a shared machine, the least disturbed); the peak
bytes saved for backward (the saved-tensor meter, any device) plus what a mode keeps outside
autograd's graph (the stored segment starts, the tangents), and its ratio to the plain
unroll's; peak CUDA memory on a GPU; the chosen k; the relative difference from the plain
unroll's result (float32).

    python benchmarks/unroll_memory.py [--device cpu] [--steps 20,100,500] [--repeats 3] [--threads 1]
                                       [--quick]

Results and how to read them: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import sys
import warnings
from pathlib import Path

import torch
import torchopt

sys.path.insert(0, str(Path(__file__).parent))
import bench  # the problems and the peers' loops, shared with bench.py

from bilevel.memory import SavedTensorMemory


def with_log_decay(problem, value: float):
    """The problem at log weight decays ``value`` (its closures take them as arguments)."""
    name, inner, outer, params, logs = problem
    return name, inner, outer, params, tuple(torch.full_like(t, value) for t in logs)


def scalar_decay(problem):
    """The problem with one log weight decay shared by every weight (one hyperparameter
    entry: forward mode's case)."""
    name, inner, outer, params, logs = problem
    shared = (torch.full((), float(logs[0].flatten()[0]), dtype=logs[0].dtype, device=logs[0].device),)
    spread = lambda ls: tuple(ls[0] for _ in params)  # the scalar broadcasts against each weight
    return (
        f"{name} (1 decay)",
        lambda ps, ls: inner(ps, spread(ls)),
        lambda ps, ls: outer(ps, spread(ls)),
        params,
        shared,
    )


def implementations(steps: int, one_decay: bool):
    """name -> (callable, the HyperGradient it uses, or None for a peer)."""
    make = lambda **options: bench.ours("unroll", steps=steps, lr=bench.LR, **options)
    if one_decay:
        return {"ours (1)": make(), "ours (fwd, 1)": make(direction="forward")}
    return {
        "ours": make(),
        "ours (ckpt)": make(checkpoint="auto"),
        "torchopt": functools.partial(bench.torchopt_unroll, steps=steps),
        "higher": functools.partial(bench.higher_unroll, steps=steps),
    }


def held_bytes(fn, problem, device: str) -> tuple[int, int | None, dict]:
    """From one call: the peak bytes saved for backward (the saved-tensor meter) plus those
    a mode of ours holds outside the graph (stored segment starts, tangents), the peak CUDA
    bytes (None on the CPU), and our mode's stats (empty for a peer)."""
    _, inner, outer, params, logs = problem
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with SavedTensorMemory() as meter:
        fn(inner, outer, params, logs)
    hg = getattr(fn, "hg", None)
    extra = dict(hg.stats.extra) if hg is not None else {}
    outside = extra.get("checkpoint_bytes", 0) + extra.get("tangent_bytes", 0)
    return meter.peak + outside, torch.cuda.max_memory_allocated() if cuda else None, extra


def run_problem(problem, steps: int, repeats: int, device: str):
    """The rows of one problem at T = ``steps``."""
    one_decay = problem[0].endswith("(1 decay)")
    fns = implementations(steps, one_decay)
    results = bench.measure(fns, problem, repeats, device)
    reference = "ours (1)" if one_decay else "ours"
    _, _, plain_result, plain_rounds = results[reference]
    memory = {name: held_bytes(fn, problem, device) for name, fn in fns.items()}
    rows = []
    for name, (seconds, _, result, rounds) in results.items():
        held, peak_cuda, extra = memory[name]
        diff = max(float((a - b).norm() / b.norm()) for a, b in zip(result, plain_result))
        rows.append(
            {
                "problem": problem[0],
                "steps": steps,
                "implementation": name,
                "seconds": seconds,
                "time_ratio": bench.paired_ratio(rounds, plain_rounds),
                "min_ratio": min(rounds) / min(plain_rounds),
                "held": held,
                "memory_ratio": held / memory[reference][0],
                "cuda": peak_cuda,
                "k": extra.get("checkpoint_segment"),
                "diff": diff,
            }
        )
    return rows


def print_row(row) -> None:
    cuda = f"{row['cuda'] / 2**20:8.1f}" if row["cuda"] is not None else f"{'n/a':>8}"
    k = str(row["k"]) if row["k"] is not None else "-"
    print(
        f"{row['problem']:<20} {row['steps']:>4} {row['implementation']:<14} {row['seconds'] * 1e3:9.1f} "
        f"{row['time_ratio']:7.2f} {row['min_ratio']:7.2f} {row['held'] / 2**20:9.2f} "
        f"{row['memory_ratio']:7.3f} {cuda} {k:>3} {row['diff']:9.1e}",
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", default="20,100,500")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=float, default=2e4, help="MLP parameter count")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny problems, T = 4, 9")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared CPU, more threads than idle cores stall)",
    )
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, as found


def _run(args):
    steps = [int(s) for s in args.steps.split(",")]
    if args.quick:  # tests/test_benchmarks.py
        steps, args.repeats, args.size, args.batch = [4, 9], 1, 2e3, 16
    mlp = bench.mlp_problem(args.size, args.device, args.batch)
    cnn = with_log_decay(bench.cnn_problem(args.device, batch=args.batch // 4), -4.0)
    problems = [mlp, cnn, scalar_decay(mlp)]
    print(
        f"torch {torch.__version__}, torchopt {torchopt.__version__}, "
        f"higher {importlib.metadata.version('higher')}, "
        f"device {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, "
        f"threads {torch.get_num_threads()}, median of {args.repeats}, MLP batch {args.batch}, "
        f"CNN batch {args.batch // 4}"
    )
    print(
        f"{'problem':<20} {'T':>4} {'implementation':<14} {'ms':>9} {'/plain':>7} {'min':>7} {'held MiB':>9} "
        f"{'/plain':>7} {'CUDA MiB':>8} {'k':>3} {'diff':>9}"
    )
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for problem in problems:
            for t in steps:
                for row in run_problem(problem, t, args.repeats, args.device):
                    print_row(row)
                    rows.append(row)
    return rows


if __name__ == "__main__":
    main()
