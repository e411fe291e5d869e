"""The benchmark script runs, and every implementation in it computes the same hypergradient
as the hand-written floor (so the timings compare the same algorithm)."""
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench.py"


def test_benchmark_quick_run_agrees_with_the_floor(capsys):
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick"])
    implementations = {(problem, algorithm, name) for problem, algorithm, name, *_ in rows}
    assert len(implementations) == len(rows) == 2 * (3 + 4 + 5)  # MLP and CNN; cg, neumann, unroll
    for problem, algorithm, name, seconds, to_floor, to_peer, memory, diff in rows:
        assert seconds > 0 and to_floor > 0
        assert diff < 1e-4, (problem, algorithm, name, diff)  # float32, same algorithm as the floor
    assert "/floor" in capsys.readouterr().out


def test_overhead_counts_no_more_launches_or_reads_than_needed():
    """benchmarks/overhead.py on the CUDA code path (emulated on the CPU): per call, each of
    our modes dispatches fewer ops (about one kernel launch each on a GPU) than the
    hand-written floor, and reads the device back only where it must: Neumann once for its
    norms and once for the NaN checks, unrolled SGD once, CG once per iteration plus two."""
    for name in ("bench", "overhead"):
        spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    import torch

    threads = torch.get_num_threads()
    rows = module.main(["--repeats", "1"])
    assert torch.get_num_threads() == threads  # the script's settings do not leak
    table = {(algorithm, name): (ops, reads) for algorithm, name, ops, reads, *_ in rows}
    for algorithm, implementation in [("cg", "ours"), ("neumann", "ours"), ("unroll", "ours")]:
        ops, reads = table[(algorithm, implementation)]
        floor_ops, floor_reads = table[(algorithm, "floor")]
        assert floor_reads == 0 and ops < floor_ops, (algorithm, ops, floor_ops)
    assert table[("neumann", "ours")][1] == 2
    assert table[("unroll", "ours")][1] == 1
    assert table[("cg", "ours")][1] == 20 + 2
