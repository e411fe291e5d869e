"""CG where plain CG goes wrong: negative and near-zero curvature (the minimum-residual
iterate, the damping ramp) and loss of orthogonality (re-orthogonalisation)."""

import warnings
from pathlib import Path

import pytest
import torch

import bilevel
from bilevel import HyperGradient
from bilevel._src.solvers import conjugate_gradient, conjugate_gradient_report, damping_ramp, gmres

from problems import load_script, rel_error, ridge, saddle, symmetric_system

f64 = torch.float64
INDEFINITE = [3.0, 2.0, 1.0, 0.5, -0.2, 0.1, 1.5, 2.5, 0.05, -0.01, 4.0, 0.3]
SCRIPT = Path(__file__).parent.parent / "benchmarks" / "krylov.py"


def true_residual(matrix, v, x):
    b = torch.cat(v)
    return float((b - matrix @ torch.cat(x)).norm() / b.norm())


def test_an_iterate_blown_up_by_near_zero_curvature_is_not_returned():
    # pᵀHp = 2e-3 at the first step sends x₁ to 500·v (residual ~700 ‖v‖); the second step
    # meets negative curvature. Plain CG returned x₁; the solve returns x = 0 (residual ‖v‖).
    matrix = torch.diag(torch.tensor([1.0, -1.0, 2.0, -3.0], dtype=f64))
    v = (torch.tensor([1.0, 0.999, 0.0, 0.0], dtype=f64),)
    x1 = (v[0] @ v[0]) / (v[0] @ matrix @ v[0]) * v[0]
    assert true_residual(matrix, v, (x1,)) > 100
    result = conjugate_gradient(lambda x: (matrix @ x[0],), v, 10)
    assert result.negative_curvature and "implicit-minres" in result.message and "damping" in result.message
    assert result.residual == true_residual(matrix, v, result.x) == 1.0 and result.iterate == 0
    one = conjugate_gradient(lambda x: (matrix @ x[0],), v, 1)  # no breakdown, but blown up
    assert not one.negative_curvature and one.residual == 1.0 and one.iterate == 0


@pytest.mark.parametrize("seed", range(6))
def test_at_negative_curvature_cg_returns_its_minimum_residual_iterate_on_both_loops(seed):
    matrix, matvec, v = symmetric_system(INDEFINITE, seed=seed)
    result = conjugate_gradient(matvec, v, 50, tol=1e-10)
    assert result.negative_curvature and not result.converged
    # each shorter solve that meets no breakdown returns its own last iterate
    residuals = [1.0] + [conjugate_gradient(matvec, v, j).residual for j in range(1, result.iters)]
    assert result.residual == pytest.approx(min(residuals), rel=1e-12) and result.residual <= 1.0
    assert result.residual == pytest.approx(true_residual(matrix, v, result.x), rel=1e-9)
    assert residuals[result.iterate] == pytest.approx(result.residual, rel=1e-12)
    device = conjugate_gradient_report(conjugate_gradient(matvec, v, 50, tol=1e-10, sync=False), 1e-10)
    assert device.iters == result.iters and device.negative_curvature
    assert device.residual == pytest.approx(result.residual, rel=1e-12)
    for a, b in zip(device.x, result.x):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_the_damping_ramp_grows_until_cg_meets_no_negative_curvature():
    matrix, matvec, v = symmetric_system(INDEFINITE, seed=1)
    result, damping = damping_ramp(matvec, v, 100, 1e-10, 0.04)
    assert damping == pytest.approx(0.04 * 4**2)  # 0.04 and 0.16 are below |λmin| = 0.2
    assert result.converged and not result.negative_curvature and result.products <= 100
    shifted = torch.linalg.solve(matrix + damping * torch.eye(len(INDEFINITE), dtype=f64), torch.cat(v))
    assert rel_error(torch.cat(result.x), shifted) < 1e-9
    starved, _ = damping_ramp(matvec, v, 5, 1e-10, 1e-3)  # out of budget: the last solve
    assert starved.products == 5 and not starved.converged and starved.residual <= 1.0
    with pytest.raises(ValueError, match="damping > 0"):
        damping_ramp(matvec, v, 10, 1e-10, 0.0)


def test_implicit_cg_damping_auto_reports_the_damping_and_stays_quiet_when_it_succeeds():
    inner, outer, theta, phi = saddle()  # H = diag(1, −1)
    hg = HyperGradient("implicit-cg", damping="auto", tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = hg.compute(inner, outer, theta, phi)
    damping = hg.stats.extra["damping"]
    assert hg.stats.extra["lambda_max"] == pytest.approx(1.0)
    assert damping == pytest.approx(0.01 * 4**4)  # the first λ above 1 = |λmin|
    # undamped CG first (it meets the negative curvature), then power iterations and the ramp
    # with the rest of the budget: the products and iterations of both count
    matvec, v = lambda x: (torch.tensor([1.0, -1.0], dtype=f64) * x[0],), (2 * theta.detach(),)
    undamped = conjugate_gradient(matvec, v, 50, 1e-12)
    ramp, _ = damping_ramp(matvec, v, 50 - undamped.products, 1e-12, 0.01)
    assert undamped.negative_curvature and hg.stats.converged
    assert hg.stats.hvps == undamped.products + 10 + ramp.products
    assert hg.stats.iters == undamped.iters + ramp.iters
    expected = HyperGradient("implicit-cg", damping=damping, tol=1e-12).compute(inner, outer, theta, phi)
    assert rel_error(got, expected) < 1e-12
    with pytest.warns(bilevel.HypergradientWarning, match="implicit-minres.*damping='auto'"):
        HyperGradient("implicit-cg").compute(inner, outer, theta, phi)


def test_implicit_cg_damping_auto_on_a_positive_definite_problem_is_undamped_cg():
    # undamped CG meets no negative curvature: no power iteration, no damping, damping=0's answer
    problem = ridge()
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    auto = HyperGradient("implicit-cg", damping="auto", tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = auto.compute(*args)
    plain = HyperGradient("implicit-cg", tol=1e-12)
    expected = plain.compute(*args)
    assert rel_error(got, expected) < 1e-9 and rel_error(got, problem.exact_hypergradient()) < 1e-9
    assert auto.stats.extra["damping"] == 0.0 and "lambda_max" not in auto.stats.extra
    assert auto.stats.converged and not auto.stats.negative_curvature
    assert auto.stats.hvps == plain.stats.hvps and auto.stats.iters == plain.stats.iters


def test_implicit_cg_damping_auto_out_of_budget_returns_the_undamped_breakdown():
    # the undamped attempt meets the negative curvature at its last product: no budget to damp
    inner, outer, theta, phi = saddle()
    matvec, v = lambda x: (torch.tensor([1.0, -1.0], dtype=f64) * x[0],), (2 * theta.detach(),)
    budget = conjugate_gradient(matvec, v, 50, 1e-12).products
    hg = HyperGradient("implicit-cg", damping="auto", tol=1e-12, iters=budget)
    with pytest.warns(bilevel.HypergradientWarning, match="negative curvature"):
        hg.compute(inner, outer, theta, phi)
    assert hg.stats.negative_curvature and not hg.stats.converged
    assert hg.stats.extra["damping"] == 0.0 and "lambda_max" not in hg.stats.extra
    assert hg.stats.hvps == budget


def test_new_cg_options_are_validated_at_construction():
    with pytest.raises(ValueError, match="number >= 0 or 'auto'"):
        HyperGradient("implicit-cg", damping="big")
    with pytest.raises(TypeError, match="option reorthogonalize"):
        HyperGradient("implicit-cg", reorthogonalize=1)
    with pytest.raises(ValueError, match="option power_iters"):
        HyperGradient("implicit-cg", power_iters=0)
    for options in ({"damping": "auto"}, {"reorthogonalize": True}):
        with pytest.raises(ValueError, match="compile does not support.*compile=False"):
            HyperGradient("implicit-cg", compile=True, **options)
    _, matvec, v = symmetric_system(INDEFINITE)
    with pytest.raises(ValueError, match="reorthogonalize=True needs the host loop"):
        conjugate_gradient(matvec, v, 5, reorthogonalize=True, sync=False)


def ridge_system(kappa, size=1000, dtype=f64):
    """Ridge ``XᵀX/n + λI`` with feature scales 1/j: the spectrum of the issue's ridge problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * size, size, generator=g, dtype=f64) / torch.arange(1, size + 1, dtype=f64)
    gram = x.T @ x / (2 * size)
    low, high = torch.linalg.eigvalsh(gram)[[0, -1]].tolist()
    matrix = gram + max((high - kappa * low) / (kappa - 1), 0.0) * torch.eye(size, dtype=f64)
    v = (x.T @ torch.randn(2 * size, generator=g, dtype=f64) / (2 * size)).to(dtype)
    return matrix.to(dtype), v


def test_reorthogonalised_cg_needs_about_gmres_products_where_plain_cg_loses_orthogonality():
    matrix, v = ridge_system(1e4)
    matvec = lambda x: (matrix @ x[0],)
    plain = conjugate_gradient(matvec, (v,), 500, tol=1e-6)
    again = conjugate_gradient(matvec, (v,), 500, tol=1e-6, reorthogonalize=True)
    reference = gmres(matvec, (v,), 500, tol=1e-6)
    assert plain.converged and again.converged and reference.converged
    assert again.products <= 1.1 * reference.products and plain.products > 1.5 * again.products
    assert true_residual(matrix, (v,), again.x) < 1.1e-6
    overlapped = conjugate_gradient(matvec, (v,), 500, tol=1e-6, reorthogonalize=True, overlap=True)
    assert torch.equal(overlapped.x[0], again.x[0]) and overlapped.products == again.products + 1
    problem = ridge()
    hg = HyperGradient("implicit-cg", tol=1e-12, reorthogonalize=True)
    got = hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert rel_error(got, problem.exact_hypergradient()) < 1e-10
    assert hg.stats.converged and hg.stats.hvps == hg.stats.iters + 1  # and the measured residual


@pytest.mark.slow
def test_krylov_benchmark_quick_run(capsys):
    rows = load_script(SCRIPT).main(["--quick"])
    out = capsys.readouterr().out
    assert "reorth" in out and "minres" in out and "dense" in out
    assert rows["mlp"]["minres"]["error"] < 1e-4 and rows["mlp"]["dense"]["error"] == 0.0
