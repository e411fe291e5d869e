"""Host overhead per hypergradient call, ours against the floor and the peers, on any machine.

A small problem on a GPU is bound by the host: each op costs a launch (Python, dispatcher,
driver), and each read of a device value (``.tolist()``, ``float(t)``, ``bool(t)``) drains
the launch queue. This script measures both causes without a GPU, for the implementations of
``bench.py``:

- ``ops``: tensor ops dispatched per call (PyTorch's dispatcher, views and other
  metadata-only ops left out), about one kernel launch each on a GPU;
- ``reads``: values read back to the host per call (a GPU synchronisation each);
- ``us``: the median time of a call at a tiny size (an MLP of 2e3 parameters, batch 8, one
  thread), where the arithmetic is negligible and what remains is host work; and its ratio to
  the floor's.

By default the solvers' inner products take the form they take on CUDA (``torch.dot`` per
pair; the CPU's is ``(x * y).sum()``), so the counts are those of a GPU run;
``--no-cuda-algebra`` keeps the CPU's.

    python benchmarks/overhead.py [--repeats 200] [--algorithms cg,neumann,unroll] [--no-cuda-algebra]

Results and how to read them: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import warnings

import bench
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from bilevel._src import tree_math as solvers

#: Tensor methods that copy a value to the host (on a GPU: wait for the queue to drain)
HOST_READS = {"tolist", "item", "__float__", "__int__", "__bool__", "__index__"}


class _Ops(TorchDispatchMode):
    """Counts the ops that reach the dispatcher, except views and metadata-only ops."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in (torch.ops.aten.detach, torch.ops.aten.lift_fresh):
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class _Reads(TorchFunctionMode):
    """Counts the Tensor methods that read a value back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count(fn, problem) -> tuple[int, int]:
    """(ops, host reads) of one call, after a warm-up call."""
    _, inner, outer, params, logs = problem
    fn(inner, outer, params, logs)
    with _Reads() as reads, _Ops() as ops:
        fn(inner, outer, params, logs)
    return sum(ops.counts.values()), reads.count


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--algorithms", default="cg,neumann,unroll")
    parser.add_argument(
        "--no-cuda-algebra", action="store_true", help="keep the CPU's form of the solvers' inner products"
    )
    args = parser.parse_args(argv)
    blas_dot, threads = solvers._blas_dot, torch.get_num_threads()
    if not args.no_cuda_algebra:  # CUDA's inner products (torch.dot per pair), on the CPU
        solvers._blas_dot = lambda tensors: not torch.compiler.is_compiling()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(args)
    finally:
        solvers._blas_dot = blas_dot
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> list[tuple]:
    # weight decay e³: at this size and point the Hessian has curvature below −1, where our CG
    # (rightly) stops and the floor runs on; the decay makes every implementation run 20 iterations
    problem = bench.mlp_problem(2e3, "cpu", batch=8, log_decay=3.0)
    print(
        f"torch {torch.__version__}, one thread, {problem[0]} batch 8, "
        f"{'CPU' if args.no_cuda_algebra else 'CUDA'} tuple algebra, median of {args.repeats}"
    )
    print(f"{'algorithm':<8} {'implementation':<19} {'ops':>6} {'reads':>6} {'us':>8} {'/floor':>7}")
    rows = []
    for algorithm in args.algorithms.split(","):
        implementations = bench.ALGORITHMS[algorithm]
        counts = {name: count(fn, problem) for name, fn in implementations.items()}
        timed = bench.measure(implementations, problem, args.repeats, "cpu")
        for name in implementations:
            ops, reads = counts[name]
            seconds, rounds = timed[name][0], timed[name][3]
            ratio = bench.paired_ratio(rounds, timed["floor"][3])
            print(
                f"{algorithm:<8} {name:<19} {ops:6d} {reads:6d} {seconds * 1e6:8.0f} {ratio:7.2f}", flush=True
            )
            rows.append((algorithm, name, ops, reads, seconds, ratio))
    return rows


if __name__ == "__main__":
    main()
