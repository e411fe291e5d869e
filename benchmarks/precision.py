"""The accuracy cost of low-precision Hessian products (``autocast=torch.bfloat16``).

On the benchmark MLP (float32 parameters), each implicit mode runs at the benchmark's budget
(20 CG iterations / 20 Neumann terms) in float32 and with the gradient graph under
``torch.autocast`` (bf16 matmuls in every Hessian and mixed product; the solver accumulates
in float32). Reports, against a float64 reference with the same budget (the error of the
solver's arithmetic, not of its truncation): relative error and cosine of each, and the
median time of a call.

    python benchmarks/precision.py [--device cuda] [--sizes 2e4,1e5] [--repeats 5]

bf16 matmuls are fast on GPUs with tensor cores; on most CPUs they are emulated and slow, so
the CPU timings here say nothing about the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench import ALPHA, DAMPING, ITERS, leaves, mlp_problem

from bilevel import HyperGradient

MODES = {
    "cg": ("implicit-cg", {"iters": ITERS, "tol": 0.0, "damping": DAMPING}),
    "neumann": ("implicit-neumann", {"iters": ITERS, "alpha": ALPHA}),
}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def timed(hg: HyperGradient, args, repeats: int, device: str):
    result = hg.compute(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hg.compute(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return flat(result), statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="2e4,1e5")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}, device "
        f"{torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}, "
        f"median of {args.repeats}"
    )
    print(f"{'problem':<12} {'mode':<8} {'precision':<9} {'rel. error':>10} {'cosine':>9} {'ms':>8}")
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        name, inner, outer, params, logs = mlp_problem(size, args.device)
        _, inner64, outer64, params64, logs64 = mlp_problem(size, args.device, dtype=torch.float64)
        for key, (mode, options) in MODES.items():
            reference = flat(
                HyperGradient(mode, **options).compute(inner64, outer64, leaves(params64), leaves(logs64))
            )
            for precision, autocast in (("float32", None), ("bfloat16", torch.bfloat16)):
                hg = HyperGradient(mode, autocast=autocast, **options)
                result, seconds = timed(
                    hg, (inner, outer, leaves(params), leaves(logs)), args.repeats, args.device
                )
                error = float((result - reference).norm() / reference.norm())
                cosine = float(result @ reference / (result.norm() * reference.norm()))
                print(
                    f"{name:<12} {key:<8} {precision:<9} {error:10.1e} {cosine:9.5f} {seconds * 1e3:8.1f}",
                    flush=True,
                )
                rows.append((name, key, precision, error, cosine, seconds))
    return rows


if __name__ == "__main__":
    main()
