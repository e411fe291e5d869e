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
    norms and once for the NaN checks, unrolled SGD once, CG once per iteration plus three
    (the last: its true residual)."""
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
    assert table[("cg", "ours")][1] == 20 + 3


def test_ratio_interval_is_the_binomial_order_statistic_interval():
    """For 11 rounds the ≥95% interval of the median is the 2nd to the 10th smallest ratio
    (coverage 1 − 2·12/2¹¹ = 0.988; the 3rd to the 9th would cover only 0.935); for 15 the
    4th to the 12th; below 6 rounds, the min and the max."""
    bench = load_script(SCRIPT)
    for n, expected in [(5, (1, 5)), (11, (2, 10)), (15, (4, 12))]:
        times = [float(i) for i in range(n, 0, -1)]  # unsorted on purpose
        assert bench.ratio_interval(times, [1.0] * n) == expected
    assert bench.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0  # ratios 2, 3, 3


@pytest.mark.slow
def test_unroll_memory_quick_run_agrees_and_bounds_the_memory(capsys):
    """benchmarks/unroll_memory.py: every implementation computes the plain unroll's
    hypergradient, the checkpointed one holds less, and forward mode's memory is flat."""
    import torch

    load_script(SCRIPT)  # bench, which the script imports
    threads = torch.get_num_threads()
    rows = load_script(SCRIPT.parent / "unroll_memory.py").main(["--quick"])
    assert torch.get_num_threads() == threads  # the script's settings do not leak
    names = {row["implementation"] for row in rows}
    assert names == {"ours", "ours (ckpt)", "torchopt", "higher", "ours (1)", "ours (fwd, 1)"}
    for row in rows:
        assert row["diff"] < 1e-4 and row["seconds"] > 0, row  # float32, the same steps
        if row["implementation"] == "ours (ckpt)":
            assert row["memory_ratio"] < 1 and row["k"] == {4: 2, 9: 3}[row["steps"]], row
    forward = [row["held"] for row in rows if row["implementation"] == "ours (fwd, 1)"]
    assert len(forward) == 2 and forward[0] == forward[1]
    assert "/plain" in capsys.readouterr().out


@pytest.mark.slow
def test_first_order_quick_run_matches_autograd_products(capsys):
    """benchmarks/first_order.py --quick: with the default step, finite-difference products give
    the autograd products' hypergradient to 1e-6 relative in float64 (both solvers), and the
    cost table reports two gradient evaluations per product (20 products and the mixed one)."""
    load_script(SCRIPT)  # first_order imports bench
    module = load_script(SCRIPT.parent / "first_order.py")
    rows = module.main(["--quick"])
    accuracy = [r for r in rows if isinstance(r, module.AccuracyRow)]
    default64 = {r.algorithm: r.error for r in accuracy if r.default and r.dtype == "float64"}
    assert set(default64) == {"cg", "neumann"}
    assert all(error < 1e-6 for error in default64.values()), default64
    cost = [r for r in rows if isinstance(r, module.CostRow) and r.hvp == "finite-difference"]
    assert {r.algorithm for r in cost} == {"cg", "neumann"}
    assert all(r.evaluations == 2 * (r.products + 1) and r.seconds > 0 for r in cost)
    assert "relative error of finite-difference products" in capsys.readouterr().out


@pytest.mark.slow
def test_every_default_is_accurate_or_flagged():
    """benchmarks/defaults.py: no implicit mode (nor the penalty mode) at its defaults is more
    than 1e-2 off the dense solve without saying so, on the tests' and examples' problems."""
    rows = load_script(SCRIPT.parent / "defaults.py").main([])
    assert len(rows) >= 4 * 8
    bad = [
        (problem, mode, error) for problem, mode, error, _, flagged in rows if error > 1e-2 and not flagged
    ]
    assert not bad, bad
