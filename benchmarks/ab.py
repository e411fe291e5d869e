"""Time this checkout's bilevel against another checkout's, in one process, call by call.

The other checkout's package is copied into a temporary folder as ``bilevel_old`` (the package
imports itself relatively, so the copy works under that name), and each round calls both on
the same MLP problem of ``bench.py``, alternating which goes first. Reports the median of the
per-round ratios new/old with its quartiles, and the largest difference of the results: a
refactor that changes no arithmetic gives 0.

    python benchmarks/ab.py --old ../previous-checkout [--sizes 1e5,3e5] [--rounds 25]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

import bilevel

CONFIGS = {
    "cg": ("implicit-cg", {"iters": bench.ITERS, "tol": 0.0, "damping": bench.DAMPING}),
    "neumann": ("implicit-neumann", {"iters": bench.ITERS, "alpha": bench.ALPHA}),
    "unroll": ("unroll", {"steps": bench.STEPS, "lr": bench.LR}),
}


def compare(old, size: float, rounds: int, algorithms: list[str]) -> None:
    name, inner, outer, params, logs = bench.mlp_problem(size, "cpu")
    for algorithm in algorithms:
        mode, options = CONFIGS[algorithm]
        hgs = {"old": old.HyperGradient(mode, **options), "new": bilevel.HyperGradient(mode, **options)}

        def call(key: str, hgs=hgs) -> tuple[float, tuple]:
            args = (inner, outer, bench.leaves(params), bench.leaves(logs))
            start = time.perf_counter()
            out = hgs[key].compute(*args)
            return time.perf_counter() - start, out

        results = {key: call(key)[1] for key in hgs}  # warm-up
        times: dict[str, list[float]] = {"old": [], "new": []}
        ratios = []
        for r in range(rounds):
            now = {}
            for key in ("old", "new") if r % 2 == 0 else ("new", "old"):
                now[key] = call(key)[0]
                times[key].append(now[key])
            ratios.append(now["new"] / now["old"])
        diff = max(float((a - b).abs().max()) for a, b in zip(results["old"], results["new"]))
        ratios.sort()
        n = len(ratios)
        print(
            f"{name:12} {algorithm:8} old {statistics.median(times['old']) * 1e3:8.1f} ms  "
            f"new {statistics.median(times['new']) * 1e3:8.1f} ms  new/old {statistics.median(ratios):.3f} "
            f"(quartiles {ratios[n // 4]:.3f}-{ratios[3 * n // 4]:.3f})  max |diff| {diff:.1e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", required=True, help="the other checkout (the folder holding bilevel/)")
    parser.add_argument("--sizes", default="1e5,3e5")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--algorithms", default="cg,neumann,unroll")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(Path(args.old) / "bilevel", Path(folder) / "bilevel_old")
        sys.path.insert(0, folder)
        import bilevel_old

        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.rounds} rounds")
        for size in args.sizes.split(","):
            compare(bilevel_old, float(size), args.rounds, args.algorithms.split(","))


if __name__ == "__main__":
    main()
