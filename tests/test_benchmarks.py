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
    assert len(implementations) == len(rows) == 2 * (3 + 3 + 5)  # MLP and CNN; cg, neumann, unroll
    for problem, algorithm, name, seconds, to_floor, to_peer, memory, diff in rows:
        assert seconds > 0 and to_floor > 0
        assert diff < 1e-4, (problem, algorithm, name, diff)  # float32, same algorithm as the floor
    assert "/floor" in capsys.readouterr().out
