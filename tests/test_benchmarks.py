"""The benchmark script runs, and every implementation in it computes the same hypergradient
as the hand-written floor (so the timings compare the same algorithm)."""

from pathlib import Path

import pytest

from problems import load_script

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "bench.py"


@pytest.mark.slow
def test_benchmark_quick_run_agrees_with_the_floor(capsys):
    bench = load_script(SCRIPT)
    rows = bench.main(["--quick"])
    implementations = {(problem, algorithm, name) for problem, algorithm, name, *_ in rows}
    assert len(implementations) == len(rows) == 2 * (3 + 4 + 5)  # MLP and CNN; cg, neumann, unroll
    for problem, algorithm, name, seconds, to_floor, to_peer, memory, diff, (low, high) in rows:
        assert seconds > 0 and low <= to_floor <= high
        assert diff < 1e-4, (problem, algorithm, name, diff)  # float32, same algorithm as the floor
    assert "/floor" in capsys.readouterr().out


def test_overhead_counts_no_more_launches_or_reads_than_needed():
    """benchmarks/overhead.py on the CUDA code path (emulated on the CPU): per call, each of
    our modes dispatches fewer ops (about one kernel launch each on a GPU) than the
    hand-written floor, and reads the device back only where it must: Neumann once for its
    norms and once for the NaN checks, unrolled SGD once, CG once per iteration plus two."""
    for name in ("bench", "overhead"):
        module = load_script(SCRIPT.parent / f"{name}.py")
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


def test_ratio_interval_is_the_binomial_order_statistic_interval():
    """For 11 rounds the ≥95% interval of the median is the 2nd to the 10th smallest ratio
    (coverage 1 − 2·12/2¹¹ = 0.988; the 3rd to the 9th would cover only 0.935); for 15 the
    4th to the 12th; below 6 rounds, the min and the max."""
    bench = load_script(SCRIPT)
    for n, expected in [(5, (1, 5)), (11, (2, 10)), (15, (4, 12))]:
        times = [float(i) for i in range(n, 0, -1)]  # unsorted on purpose
        assert bench.ratio_interval(times, [1.0] * n) == expected
    assert bench.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0  # ratios 2, 3, 3
