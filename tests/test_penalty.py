"""``mode="penalty"``: the first-order penalty estimate, its O(1/λ) bias, its convergence
report, no double backward, modules and pytrees, options, and the warm start."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bilevel import (
    BilevelProblem,
    HyperGradient,
    HypergradientWarning,
    NoDoubleBackwardError,
    SolverBreakdownError,
)
from bilevel.modes import Penalty

from problems import _Square, load_script, logistic, rel_error, ridge, roundtrip, shrinkage

f64 = torch.float64
TIGHT = {"tol": 1e-10, "steps": 3000}  # y converged far below the bias at every λ here


def _compute(problem, params=None, inner=None, **options):
    hg = HyperGradient("penalty", **options)
    got = hg.compute(
        inner or problem.inner_loss,
        problem.outer_loss,
        problem.params_star() if params is None else params,
        problem.hparams,
    )
    return got, hg.stats


@pytest.mark.parametrize("make", [ridge, logistic])
def test_the_error_falls_like_one_over_the_penalty(make):
    """With y converged, the bias is −(1/2λ)∇φ[∇θgᵀH⁻¹∇θg] + O(1/λ²): ten times smaller per
    decade of λ."""
    problem = make()
    exact = problem.exact_hypergradient()
    errors = []
    for lam in (10.0, 100.0, 1000.0):
        got, stats = _compute(problem, penalty=lam, **TIGHT)
        assert stats.converged and stats.residual <= 1e-10 and stats.hvps == 0
        assert stats.extra["penalty"] == lam and stats.extra["params_residual"] < 1e-9
        # a gradient of h at each y visited (steps + 1), ∇φh at the last, ∇f and ∇g at z
        assert stats.extra["gradient_evaluations"] == stats.iters + 4
        errors.append(rel_error(got, exact))
    assert errors[0] < 0.2
    for coarse, fine in zip(errors, errors[1:]):
        assert 8 < coarse / fine < 12, errors


def test_too_few_steps_are_reported_and_warned():
    problem = ridge()
    with pytest.warns(HypergradientWarning, match="did not converge in 3 steps.*penalty=100.*raise steps"):
        _, stats = _compute(problem, steps=3)
    assert stats.converged is False and stats.iters == 3 and stats.breakdown == "not_converged"
    assert stats.extra["initial_residual"] > stats.residual > 1e-4
    with pytest.raises(SolverBreakdownError, match="did not converge"):
        HyperGradient("penalty", steps=3, strict=True).compute(
            problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams
        )
    with pytest.warns(HypergradientWarning, match="diverged.*lower the inner optimizer's lr"):
        _, stats = _compute(problem, steps=10, lr=20.0, momentum=0.0)
    assert stats.diverged and stats.converged is False


def test_params_too_far_from_a_minimum_for_the_penalty_are_reported_and_warned():
    """params_residual = λ‖∇θf‖/‖∇θg‖ above 1/λ: y converged, but the call is not."""
    problem = ridge()
    off = (problem.params_star().detach() + 1e-3).requires_grad_()  # ‖∇θf‖ ≈ 3e-4‖∇θg‖
    match = (
        r"not close enough to a minimum.*penalty=100.*multiplies.*by the penalty.*smaller penalty.*implicit"
    )
    with pytest.warns(HypergradientWarning, match=match):
        _, stats = _compute(problem, params=off, tol=1e-8, steps=3000)
    assert stats.residual <= 1e-8 and stats.extra["params_residual"] > 1e-2
    assert stats.converged is False and stats.breakdown == "params_not_at_minimum"
    with pytest.raises(SolverBreakdownError, match="not close enough to a minimum"):
        HyperGradient("penalty", tol=1e-8, steps=3000, strict=True).compute(
            problem.inner_loss, problem.outer_loss, off, problem.hparams
        )
    with warnings.catch_warnings():  # λ = 10: params_residual ≈ 0.03 ≤ 1/λ
        warnings.simplefilter("error")
        _, stats = _compute(problem, params=off, penalty=10.0, tol=1e-8, steps=3000)
    assert stats.converged and stats.breakdown is None and stats.extra["params_residual"] <= 0.1
    # y's own breakdown comes first and is kept
    with pytest.warns(HypergradientWarning, match="did not converge in 3 steps"):
        _, stats = _compute(problem, params=off, steps=3)
    assert stats.converged is False and stats.breakdown == "not_converged"


@pytest.mark.parametrize("term", ["zero", "absent"])
def test_an_outer_loss_flat_in_params_gives_its_direct_gradient_in_no_steps(term):
    """∇θg(z) = 0: y = z, so the estimate is ∇φg(z), exactly; converged, residual 0, and no
    spurious breakdown (params_residual, relative to ‖∇θg‖ = 0, is not checked)."""
    problem = ridge()
    if term == "zero":
        outer = lambda w, lam: (lam**2).sum() + 0.0 * w.sum()
    else:
        outer = lambda w, lam: (lam**2).sum()
    for params in (problem.params_star(), (problem.params_star().detach() + 1e-3).requires_grad_()):
        hg = HyperGradient("penalty", strict=True)
        got = hg.compute(problem.inner_loss, outer, params, problem.hparams)
        assert torch.equal(got, 2 * problem.hparams.detach())
        assert hg.stats.converged and hg.stats.residual == 0.0 and hg.stats.iters == 0
        assert hg.stats.breakdown is None and hg.stats.extra["gradient_evaluations"] == 2
    # an outer loss without φ either: the estimate is zero
    hg = HyperGradient("penalty", strict=True)
    got = hg.compute(problem.inner_loss, lambda w, lam: 0.0 * w.sum(), problem.params_star(), problem.hparams)
    assert torch.equal(got, torch.zeros_like(problem.hparams)) and hg.stats.converged


def test_no_double_backward_is_needed():
    """cdist with p=1 has no double backward (implicit-cg refuses it) and a custom Function
    with a @once_differentiable backward none either: the penalty mode gives the answer of
    their differentiable equivalents, to rounding, with no warning about either."""
    problem = ridge(p=4)
    points = (
        problem.params_star().detach() + 3.0 + torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    )

    def fused(w, lam):
        return (
            problem.inner_loss(w, lam)
            + 0.1 * torch.cdist(points, w.view(1, 4), p=1).sum()
            + _Square.apply(w).sum()
        )

    def plain(w, lam):
        return problem.inner_loss(w, lam) + 0.1 * (points - w).abs().sum() + (w * w).sum()

    theta = problem.params_star().detach().clone().requires_grad_()
    for _ in range(20):  # Newton on the differentiable equivalent: the params of both problems
        grad = torch.autograd.grad(plain(theta, problem.hparams.detach()), theta)[0]
        hessian = torch.autograd.functional.hessian(lambda w: plain(w, problem.hparams.detach()), theta)
        theta = (theta - torch.linalg.solve(hessian, grad)).detach().requires_grad_()
    with pytest.warns(HypergradientWarning, match="holds _Square"), pytest.raises(NoDoubleBackwardError):
        HyperGradient("implicit-cg").compute(fused, problem.outer_loss, theta, problem.hparams)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, stats = _compute(problem, params=theta, inner=fused, penalty=1e4, **TIGHT)
    expected, _ = _compute(problem, params=theta, inner=plain, penalty=1e4, **TIGHT)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    exact = HyperGradient("implicit-exact").compute(plain, problem.outer_loss, theta, problem.hparams)
    assert stats.converged and rel_error(got, exact) < 1e-3


def test_modules_pytrees_and_buffers_are_left_as_they_were():
    """An nn.Linear with a BatchNorm buffer as params, a dict of hparams with one the inner loss
    ignores: the result matches implicit-exact within the bias; nothing of the user's changes."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g, dtype=f64), torch.randn(40, 1, generator=g, dtype=f64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3, affine=False), nn.Linear(3, 1)).double()
    hparams = {
        "decay": torch.tensor(-1.0, dtype=f64, requires_grad=True),
        "shift": torch.tensor(0.2, dtype=f64, requires_grad=True),
    }
    inner = lambda m, h: ((m(x) - y) ** 2).mean() + h["decay"].exp() * (m[1].weight ** 2).sum()
    outer = lambda m, h: ((m(x[:20]) - y[:20] - h["shift"]) ** 2).mean()
    opt = torch.optim.LBFGS(model.parameters(), tolerance_grad=1e-13, tolerance_change=1e-16, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = inner(model, {k: v.detach() for k, v in hparams.items()})
        loss.backward()
        return loss

    opt.step(closure)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [t.detach().clone() for t in [*model.parameters(), *model.buffers(), *hparams.values()]]
    got = HyperGradient("penalty", penalty=1e3, tol=1e-8).compute(inner, outer, model, hparams)
    exact = HyperGradient("implicit-exact").compute(inner, outer, model, hparams)
    assert set(got) == {"decay", "shift"}
    assert rel_error(torch.stack(list(got.values())), torch.stack(list(exact.values()))) < 3e-3
    after = [t.detach() for t in [*model.parameters(), *model.buffers(), *hparams.values()]]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(h.grad is None for h in hparams.values())


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"penalty": 0.0}, ValueError, "option penalty must be > 0"),
        ({"penalty": "big"}, TypeError, "option penalty must be a number"),
        ({"steps": 2.5}, TypeError, "option steps must be an int"),
        ({"tol": -1.0}, ValueError, "option tol must be >= 0"),
        ({"warm_start": "yes"}, TypeError, "option warm_start must be True or False"),
        ({"inner_optimizer": 5}, TypeError, "option inner_optimizer must be a torch optimizer class"),
        ({"inner_optimizer": torch.optim.LBFGS}, TypeError, "LBFGS has no differentiable version"),
        ({"betas": (0.9, 0.99)}, TypeError, "unknown option.*betas.*penalty, steps, tol.*lr, momentum"),
        ({"iters": 3}, TypeError, "unknown option.*iters"),
    ],
)
def test_bad_options_are_refused_when_built(options, error, message):
    with pytest.raises(error, match=message):
        HyperGradient("penalty", **options)


def test_problems_with_a_stationarity_map_are_refused():
    inner, outer, w, h = shrinkage(3)
    field = lambda w, h: 2 * (w - 1) + 2 * h * w
    symmetric = BilevelProblem(None, outer, w, h, stationarity=field, symmetric=True)
    with pytest.raises(ValueError, match="stationarity map of its own; use an implicit mode"):
        HyperGradient("penalty").solve(symmetric)
    general = BilevelProblem(None, outer, w, h, stationarity=field)
    with pytest.raises(ValueError, match="symmetric inner Hessian.*implicit-exact"):
        HyperGradient("penalty").solve(general)


def test_other_inner_optimizers_reach_the_same_answer():
    problem = logistic()
    reference, _ = _compute(problem, penalty=100.0, **TIGHT)
    got, stats = _compute(
        problem, penalty=100.0, inner_optimizer=torch.optim.Adam, lr=0.02, tol=1e-8, steps=3000
    )
    assert stats.converged
    assert rel_error(got, reference) < 1e-6
    assert HyperGradient(Penalty(penalty=100.0, optimizer_options={"lr": 0.5})).mode.optimizer_options == {
        "lr": 0.5,
        "momentum": 0.9,
    }


def _moved(problem, step):
    """params a little off the minimiser, as an online loop's inner steps leave them, and
    hparams moved by an outer step."""
    lam = (problem.hparams.detach() + 0.02 * step).requires_grad_()
    w = problem.inner_solve(lam).detach()
    return w.requires_grad_(), lam


def test_the_warm_start_saves_steps_and_round_trips():
    problem = ridge()
    options = {"penalty": 1e3, "tol": 1e-8, "steps": 2000}
    warm, cold = HyperGradient("penalty", warm_start=True, **options), HyperGradient("penalty", **options)
    steps = {"warm": [], "cold": []}
    for step in range(3):
        w, lam = _moved(problem, step)
        for name, hg in (("warm", warm), ("cold", cold)):
            got = hg.compute(problem.inner_loss, problem.outer_loss, w, lam)
            assert hg.stats.converged
            steps[name].append(hg.stats.iters)
        assert warm.stats.extra["warm_started"] == (step > 0)
        assert rel_error(got, cold.compute(problem.inner_loss, problem.outer_loss, w, lam)) < 1e-6
    assert steps["warm"][0] == steps["cold"][0]  # linear convergence: steps ∝ log(r₀/tol)
    assert all(a < 0.8 * b for a, b in zip(steps["warm"][1:], steps["cold"][1:])), steps
    # a checkpoint resumes the warm start exactly
    checkpoint = roundtrip(warm.state_dict())
    assert set(checkpoint["state"]) == {"offset"}
    w, lam = _moved(problem, 3)
    expected = warm.compute(problem.inner_loss, problem.outer_loss, w, lam)
    resumed = HyperGradient("penalty", warm_start=True, **options)
    resumed.load_state_dict(checkpoint)
    assert torch.equal(resumed.compute(problem.inner_loss, problem.outer_loss, w, lam), expected)
    assert resumed.stats.iters == warm.stats.iters
    other = ridge(p=4)
    with pytest.raises(ValueError, match="changed structure, shapes or dtype since the last call"):
        resumed.compute(other.inner_loss, other.outer_loss, other.params_star(), other.hparams)
    assert HyperGradient("penalty").state_dict()["state"] == {}


@pytest.mark.slow
def test_the_benchmark_script_runs(capsys):
    results = load_script(Path(__file__).parent.parent / "benchmarks" / "penalty.py").main(["--quick"])
    converged = [row for row in results["sweep"] if "r≤" in row[2]]
    assert converged and all(row[4] <= 1e-6 for row in converged)
    assert set(results["online"]) == {"cold", "warm y", "warm offset"}
    assert "rel. error" in capsys.readouterr().out
