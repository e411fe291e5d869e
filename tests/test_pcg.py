"""Nyström-preconditioned CG: the solver against dense solves and plain CG, and
``implicit-cg`` with ``preconditioner="nystrom"``: the same answers, the sketch kept across
calls and refreshed, its state in checkpoints, and the options it refuses."""

from pathlib import Path

import pytest
import torch

from bilevel import HyperGradient
from bilevel._src.solvers import conjugate_gradient
from bilevel._src.solvers.nystrom import Sketch, gaussian_sketch, nystrom_preconditioner
from bilevel.modes._kept_sketch import _Use

from problems import load_script, logistic, rel_error, ridge, roundtrip, symmetric_system

f64 = torch.float64
SCRIPT = Path(__file__).parent.parent / "benchmarks" / "pcg.py"
# a flat bulk (κ = 10) under 8 large outliers up to 1e5: κ = 1e5, the outliers set it
OUTLIERS = torch.cat((torch.logspace(0, 1, 112, dtype=f64), torch.logspace(3, 5, 8, dtype=f64))).tolist()


def preconditioner_for(matrix, rank, damping=0.0, seed=0):
    sketch = gaussian_sketch(
        lambda rows: rows @ matrix,
        matrix.shape[0],
        rank,
        f64,
        torch.device("cpu"),
        torch.Generator().manual_seed(seed),
    )
    return nystrom_preconditioner(sketch, damping), sketch


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_pcg_matches_a_dense_solve(damping):
    matrix, matvec, v = symmetric_system(OUTLIERS, seed=2)
    precondition, _ = preconditioner_for(matrix, 12, damping)
    result = conjugate_gradient(matvec, v, 300, tol=1e-14, damping=damping, preconditioner=precondition)
    exact = torch.linalg.solve(matrix + damping * torch.eye(len(OUTLIERS), dtype=f64), torch.cat(v))
    assert rel_error(torch.cat(result.x), exact) < 1e-10
    # the residual reported (and tested against tol) is the unpreconditioned one
    loose = conjugate_gradient(matvec, v, 300, tol=1e-8, damping=damping, preconditioner=precondition)
    b, x = torch.cat(v), torch.cat(loose.x)
    true = float((b - matrix @ x - damping * x).norm() / b.norm())
    assert loose.converged and loose.residual == pytest.approx(true, rel=1e-4) and true <= 1e-8


def test_pcg_needs_fewer_products_than_cg_when_a_few_outliers_set_the_condition_number():
    matrix, matvec, v = symmetric_system(OUTLIERS, seed=3)
    plain = conjugate_gradient(matvec, v, 500, tol=1e-8)
    precondition, _ = preconditioner_for(matrix, 12)
    pcg = conjugate_gradient(matvec, v, 500, tol=1e-8, preconditioner=precondition)
    assert plain.converged and pcg.converged
    assert pcg.products + 12 < plain.products  # the sketch's 12 products included


def test_the_preconditioner_flattens_the_sketched_eigenvalues():
    matrix, _, _ = symmetric_system(OUTLIERS, seed=4)
    n = len(OUTLIERS)
    precondition, _ = preconditioner_for(matrix, n)  # a full-rank sketch: M = A up to scale
    inverse = torch.stack([precondition((e,))[0] for e in torch.eye(n, dtype=f64)])
    assert torch.allclose(inverse, inverse.T, atol=1e-10)
    eigenvalues = torch.linalg.eigvals(inverse @ matrix).real
    assert float(eigenvalues.max() / eigenvalues.min()) < 1 + 1e-6


def test_a_sketch_without_curvature_gives_the_identity():
    sketch = Sketch(torch.eye(5, 2, dtype=f64), torch.zeros(2, dtype=f64), singular=True)
    r = (torch.arange(5, dtype=f64),)
    assert torch.equal(nystrom_preconditioner(sketch)(r)[0], r[0])
    with pytest.raises(ValueError, match="damping"):
        nystrom_preconditioner(sketch, -1.0)


def test_the_solver_refuses_a_preconditioner_off_the_host_loop():
    _, matvec, v = symmetric_system([1.0, 2.0, 3.0])
    for options in ({"sync": False}, {"reorthogonalize": True}):
        with pytest.raises(ValueError, match="host loop"):
            conjugate_gradient(matvec, v, 5, preconditioner=lambda r: r, **options)


def compute(hg, problem):
    return hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)


@pytest.mark.parametrize("make, rank", [(ridge, 3), (ridge, 20), (logistic, 2)])
def test_implicit_cg_with_the_preconditioner_gives_plain_cgs_answer(make, rank):
    problem = make()
    plain = compute(HyperGradient("implicit-cg", tol=1e-12), problem)
    hg = HyperGradient("implicit-cg", tol=1e-12, preconditioner="nystrom", rank=rank)
    got = compute(hg, problem)
    assert rel_error(got, plain) < 1e-9 and rel_error(got, problem.exact_hypergradient()) < 1e-8
    facts = hg.stats.extra["preconditioner"]
    assert facts["refreshed"] and facts["rank"] == min(rank, 6 if make is ridge else 5)
    assert hg.stats.hvps == hg.stats.iters + facts["rank"] + 1 and hg.stats.converged  # + true residual


def test_the_sketch_is_reused_and_refreshed_every_refresh_calls():
    problem = ridge(p=8)
    hg = HyperGradient("implicit-cg", tol=1e-10, preconditioner="nystrom", rank=4, refresh=3)
    seen = []
    for _ in range(4):
        compute(hg, problem)
        facts = hg.stats.extra["preconditioner"]
        seen.append((facts["refreshed"], facts["calls"]))
        sketch = 4 if facts["refreshed"] else 0
        assert hg.stats.hvps == hg.stats.iters + sketch + 1  # and the true residual
    assert seen == [(True, 1), (False, 2), (False, 3), (True, 1)]


def test_a_sketch_is_stale_when_pcg_needs_many_more_iterations():
    kept = _Use(Sketch(torch.eye(3, 1), torch.ones(1)), [[3]], calls=2, baseline=10, last=15)
    assert not kept.stale(50)
    kept.last = 16
    assert kept.stale(50)
    kept.baseline, kept.last = 2, 5  # a few iterations more than a small count: not stale
    assert not kept.stale(50)


def test_the_sketch_survives_a_checkpoint_and_a_shape_change_is_refused():
    problem = ridge(p=8)
    options = {"tol": 1e-10, "preconditioner": "nystrom", "rank": 4, "warm_start": True}
    hg = HyperGradient("implicit-cg", **options)
    compute(hg, problem)
    state = roundtrip(hg.state_dict())
    assert state["state"]["sketch"]["basis"].shape == (8, 4) and state["layout"] is not None
    resumed = HyperGradient("implicit-cg", **options)
    resumed.load_state_dict(state)
    expected = compute(hg, problem)
    got = compute(resumed, problem)
    assert not resumed.stats.extra["preconditioner"]["refreshed"]
    assert resumed.stats.hvps == hg.stats.hvps and torch.equal(got, expected)
    with pytest.raises(ValueError, match="changed structure, shapes"):
        compute(resumed, ridge(p=5))


def test_a_sketch_that_does_not_fit_is_made_again():
    hg = HyperGradient("implicit-cg", preconditioner="nystrom", rank=4)
    mode = hg.mode
    mode._kept.use = _Use(Sketch(torch.eye(5, 4, dtype=f64), torch.ones(4, dtype=f64)), [[5]])
    compute(hg, ridge(p=8))  # a mode given a foreign sketch drops it
    assert hg.stats.extra["preconditioner"]["refreshed"] and mode._kept.use.shapes == [[8]]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"preconditioner": "jacobi"}, "preconditioner must be None or 'nystrom'"),
        ({"preconditioner": "nystrom", "compile": True}, "compile=False"),
        ({"preconditioner": "nystrom", "reorthogonalize": True}, "reorthogonalize=False"),
        ({"preconditioner": "nystrom", "damping": "auto"}, "damping='auto'"),
        ({"preconditioner": "nystrom", "rank": 0}, "rank"),
        ({"preconditioner": "nystrom", "refresh": 0}, "refresh"),
    ],
)
def test_options_that_do_not_fit_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        HyperGradient("implicit-cg", **options)


@pytest.mark.slow
def test_the_benchmark_runs(capsys):
    rows = load_script(SCRIPT).main(["--steps", "3", "--size", "200", "--ranks", "5"])
    assert len(rows) == 2 * 2 * 2 * 2  # spectra, κ, warm start, cg and pcg-5
    assert all(residual <= 1e-6 and gap < 1e-4 for *_, residual, gap in rows)
    assert "pcg-5" in capsys.readouterr().out
