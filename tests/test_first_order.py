"""Finite-difference products (``hvp="finite-difference"``): every implicit mode from
first-order gradients only, against the same mode with autograd products and exact answers."""

import math
import warnings

import pytest
import torch
from torch import nn

from bilevel import BilevelProblem, HyperGradient
from bilevel._src.products import ProductRule, StationarityJacobian
from bilevel.auxiliary import MetaOptimizer
from bilevel.errors import HypergradientWarning, NoDoubleBackwardError

from problems import _Square, batchnorm_regression, logistic, rel_error, ridge

OPTIONS = {
    "implicit-cg": {},
    "implicit-neumann": {"iters": 200},
    "implicit-exact": {},
    "implicit-gmres": {},
    "implicit-nystrom": {"rank": 3},
    "implicit-identity": {"alpha": 0.5},
}
FD = {"hvp": "finite-difference"}


def compute(problem, mode, **options):
    hg = HyperGradient(mode, **OPTIONS[mode], **options)
    return hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams), hg


@pytest.mark.parametrize("mode", sorted(OPTIONS))
def test_every_mode_matches_its_autograd_products_in_float64(mode):
    """Ridge is quadratic (central differences are exact up to rounding); logistic is not
    (truncation error ∝ c² with c = ∛ε ≈ 6e-6)."""
    for problem, bar in ((ridge(), 1e-9), (logistic(), 1e-7)):
        reference, _ = compute(problem, mode)
        got, hg = compute(problem, mode, **FD)
        assert rel_error(got, reference) < bar, (mode, rel_error(got, reference))
        products = hg.stats.hvps
        assert hg.stats.extra["gradient_evaluations"] == 2 * (products + 1)  # and the mixed product
        assert hg.stats.extra["fd_eps"] == pytest.approx(torch.finfo(torch.float64).eps ** (1 / 3))


def test_converged_cg_matches_the_exact_hypergradient():
    problem = logistic(n=200, p=20)
    got, hg = compute(problem, "implicit-cg", tol=1e-10, **FD)
    assert hg.stats.converged
    assert rel_error(got, problem.exact_hypergradient()) < 1e-6


@pytest.mark.parametrize("mode", ["implicit-cg", "implicit-neumann"])
def test_float32_at_the_default_step_is_within_1e_3(mode):
    """A well-conditioned logistic regression in float32: c = ∛ε ≈ 5e-3."""
    problem = logistic(n=200, p=20, dtype=torch.float32)
    reference, _ = compute(problem, mode)
    got, _ = compute(problem, mode, **FD)
    assert rel_error(got, reference) < 1e-3


def test_a_bad_step_is_inaccurate_so_the_default_matters():
    """The step rule is not decorative: c = 0.5 has a large truncation error on a non-quadratic
    loss, c = 1e-13 a large rounding error; the default has neither."""
    problem = logistic(n=200, p=20)
    reference, _ = compute(problem, "implicit-cg", tol=1e-12)
    errors = {
        eps: rel_error(compute(problem, "implicit-cg", tol=1e-12, fd_eps=eps, **FD)[0], reference)
        for eps in (0.5, 1e-13)
    }
    default = rel_error(compute(problem, "implicit-cg", tol=1e-12, **FD)[0], reference)
    assert default < 1e-8 and min(errors.values()) > 100 * default, (default, errors)


def test_modules_with_buffers():
    model, decay, inner, outer, *_ = batchnorm_regression()
    for _ in range(300):  # near a minimiser
        grads = torch.autograd.grad(inner(model, decay.detach()), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p.sub_(0.2 * g)
    before = [t.clone() for t in list(model.parameters()) + list(model.buffers())]
    reference = HyperGradient("implicit-cg").compute(inner, outer, model, decay)
    got = HyperGradient("implicit-cg", **FD).compute(inner, outer, model, decay)
    assert rel_error(got, reference) < 1e-6
    after = list(model.parameters()) + list(model.buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in model.parameters()) and decay.grad is None


class _NoDoubleBackward(torch.autograd.Function):
    """x² whose backward refuses to run with grad mode on, as a double backward (or any
    ``create_graph=True`` pass) would run it: the test fails if the path ever needs one."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("derivative for _NoDoubleBackward is not implemented (double backward)")
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def _quartic_problem(square):
    """Inner ½‖Xw − y‖²/n + Σ exp(λ)·square(w)² (quartic weight decay), outer on held-out rows."""
    problem = ridge(p=5)
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(50, 5, generator=g, dtype=torch.float64),
        torch.randn(50, generator=g, dtype=torch.float64),
    )

    def loss(w, lam, square=square):
        return 0.5 * ((x @ w - y) ** 2).mean() + (lam.exp() * square(w) ** 2).sum()

    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    for _ in range(60):  # Newton on the smooth twin: a stationary point to rounding
        grad = torch.autograd.grad(loss(w, problem.hparams.detach(), lambda t: t * t), w, create_graph=True)[
            0
        ]
        hess = torch.stack([torch.autograd.grad(grad[i], w, retain_graph=True)[0] for i in range(5)])
        w = (w - torch.linalg.solve(hess, grad)).detach().requires_grad_()
    return loss, problem.outer_loss, w, problem.hparams


@pytest.mark.parametrize("mode", ["implicit-cg", "implicit-neumann", "implicit-exact"])
def test_no_double_backward_anywhere_on_the_path(mode):
    """An op that raises on any second-order pass: autograd products raise and name the ways
    out; finite differences run, and match autograd products on its differentiable twin."""
    inner, outer, w, lam = _quartic_problem(_NoDoubleBackward.apply)
    with pytest.raises(NoDoubleBackwardError, match="hvp='finite-difference'.*mode='penalty'"):
        HyperGradient(mode).compute(inner, outer, w, lam)
    got = HyperGradient(mode, **FD, **OPTIONS[mode]).compute(inner, outer, w, lam)
    twin_inner, *_ = _quartic_problem(lambda t: t * t)
    reference = HyperGradient(mode, **OPTIONS[mode]).compute(twin_inner, outer, w, lam)
    assert rel_error(got, reference) < 1e-7


def test_cdist_which_has_no_double_backward():
    """``torch.cdist`` (p = 1) has no double backward in PyTorch; its twin is a sum of |·|."""
    problem = ridge(p=4)
    points = torch.randn(1, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inner = lambda w, lam: problem.inner_loss(w, lam) + 0.1 * torch.cdist(points, w.view(1, 1, 4), p=1).sum()
    twin = lambda w, lam: problem.inner_loss(w, lam) + 0.1 * (points - w).abs().sum()
    w = problem.params_star()
    for _ in range(300):  # gradient steps to a stationary point of the non-quadratic loss
        w = (w - 0.5 * torch.autograd.grad(twin(w, problem.hparams.detach()), w)[0]).detach().requires_grad_()
    got = HyperGradient("implicit-cg", **FD).compute(inner, problem.outer_loss, w, problem.hparams)
    reference = HyperGradient("implicit-cg").compute(twin, problem.outer_loss, w, problem.hparams)
    assert rel_error(got, reference) < 1e-7


def test_once_differentiable_functions_are_right_and_not_warned_about():
    """A ``@once_differentiable`` backward makes autograd products silently wrong (and warns);
    finite differences need only its first derivative."""
    inner, outer, w, lam = _quartic_problem(_Square.apply)
    twin_inner, *_ = _quartic_problem(lambda t: t * t)
    reference = HyperGradient("implicit-cg").compute(twin_inner, outer, w, lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        got = HyperGradient("implicit-cg", **FD).compute(inner, outer, w, lam)
    assert rel_error(got, reference) < 1e-7


def test_the_product_operator_directly():
    """H x for f = ¼Σθ⁴ + θ·φ at θ: 3θ²·x (a third derivative, so not exact: O(c²) relative);
    the mixed product is x; a zero vector gives zeros and a tiny one a finite product."""
    theta = (torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),)
    phi = (torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64),)

    def gradient(point, wrt):
        return (point[0] ** 3 + phi[0],) if wrt == "theta" else (point[0],)

    operator = StationarityJacobian.from_differences(gradient, theta, phi, relative_step=1e-5)
    x = (torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64),)
    torch.testing.assert_close(operator.matvec(x)[0], 3 * theta[0] ** 2 * x[0], rtol=1e-8, atol=0)
    torch.testing.assert_close(operator.mixed(x)[0], x[0], rtol=1e-10, atol=0)
    assert torch.equal(
        operator.matvec((torch.zeros(3, dtype=torch.float64),))[0], torch.zeros(3, dtype=torch.float64)
    )
    tiny = operator.matvec((1e-200 * x[0],))[0]
    torch.testing.assert_close(tiny, 3e-200 * theta[0] ** 2 * x[0], rtol=1e-6, atol=0)
    assert operator.products == 3 and operator.evaluations == 8


def test_options_are_validated():
    with pytest.raises(ValueError, match="option hvp must be one of 'autograd', 'finite-difference'"):
        HyperGradient("implicit-cg", hvp="fd")
    with pytest.raises(ValueError, match="fd_eps sets the step of hvp='finite-difference'"):
        HyperGradient("implicit-cg", fd_eps=1e-4)
    for bad in (0.0, 1.5, "1e-4", True):
        with pytest.raises(ValueError, match="option fd_eps must be a number in"):
            HyperGradient("implicit-gmres", hvp="finite-difference", fd_eps=bad)
    with pytest.raises(ValueError, match="autocast with hvp='finite-difference'"):
        HyperGradient("implicit-cg", hvp="finite-difference", autocast=torch.bfloat16)
    assert ProductRule("finite-difference").relative_step(torch.float32) == pytest.approx(
        math.pow(torch.finfo(torch.float32).eps, 1 / 3)
    )


def test_a_stationarity_map_is_refused():
    """A difference of G gives J x, but the system needs Jᵀx: only right for gradients."""
    problem = ridge(p=3)
    field = lambda w, lam: torch.autograd.grad(problem.inner_loss(w, lam), w, create_graph=True)[0]
    bilevel = BilevelProblem(
        None, problem.outer_loss, problem.params_star(), problem.hparams, stationarity=field
    )
    with pytest.raises(ValueError, match="stationarity map is not a gradient.*use hvp='autograd'"):
        HyperGradient("implicit-gmres", **FD).solve(bilevel)


def test_meta_optimizer_refuses_the_first_order_ways_that_evaluate_elsewhere():
    aux = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="MetaOptimizer.step receives loss tensors.*AuxiliaryLearner"):
        MetaOptimizer(torch.optim.SGD([aux], lr=0.1), hpo_lr=0.1, mode="implicit-cg", **FD)
    with pytest.raises(ValueError, match="mode 'penalty' runs inner steps.*AuxiliaryLearner"):
        MetaOptimizer(torch.optim.SGD([aux], lr=0.1), hpo_lr=0.1, mode="penalty")


@pytest.mark.slow
def test_compiled_finite_differences_match_eager():
    """compile=True compiles first-order gradients only; the result is the eager one."""
    problem = logistic()
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    eager = HyperGradient("implicit-cg", tol=1e-9, iters=8, **FD).compute(*args)
    hg = HyperGradient("implicit-cg", tol=1e-9, iters=8, compile=True, **FD)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        for _ in range(2):
            got = hg.compute(*args)
    # 8 products, the true residual's and the mixed one, two gradient evaluations each
    assert hg.stats.extra.get("compiled") and hg.stats.extra["gradient_evaluations"] == 2 * (8 + 1 + 1)
    assert rel_error(got, eager) < 1e-10


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")  # far from a minimum
def test_auxiliary_learner_with_finite_differences():
    """The learner's auxiliary step from finite-difference products is the autograd one."""
    from test_auxiliary_learner import _learner

    steps = {}
    for hvp in ("autograd", "finite-difference"):
        learner, train, aux = _learner("implicit-cg", hvp=hvp, tol=1e-10, iters=100)
        for _ in range(2):
            info = learner.step(train, aux)
        assert info["auxiliary_updated"]
        steps[hvp] = learner.auxiliary.raw.grad.clone()  # the hypergradient (Adam's step hides it)
    assert rel_error(steps["finite-difference"], steps["autograd"]) < 1e-6


def test_dropout_draws_one_mask_per_call():
    """Every gradient evaluation of a call replays the same random numbers, so the products
    difference one function (the autograd path's one graph has one mask too)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1)).double()
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(64, 5, generator=g, dtype=torch.float64),
        torch.randn(64, 1, generator=g, dtype=torch.float64),
    )
    decay = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    inner = lambda m, h: ((m(x) - y) ** 2).mean() + h.exp() * sum((p**2).sum() for p in m.parameters())
    outer = lambda m, h: ((m(x[:32]) - y[:32]) ** 2).mean()
    got = {}
    for hvp in ("autograd", "finite-difference"):
        torch.manual_seed(5)
        got[hvp] = HyperGradient("implicit-exact", hvp=hvp).compute(inner, outer, net, decay)
    assert rel_error(got["finite-difference"], got["autograd"]) < 1e-6


def test_a_large_valued_tensor_does_not_inflate_the_step_along_the_others():
    """The displacement is measured along the direction (Σ|θᵢ||uᵢ|), not by ‖θ‖: a tensor held
    at 1e6 by a quadratic term leaves the logistic weights' products accurate."""
    problem = logistic()
    offset = torch.full((3,), 1e6, dtype=torch.float64, requires_grad=True)
    inner = lambda p, lam: problem.inner_loss(p[0], lam) + 0.5 * ((p[1] - 1e6) ** 2).sum()
    outer = lambda p, lam: problem.outer_loss(p[0], lam)
    params = (problem.params_star(), offset)
    reference = HyperGradient("implicit-exact").compute(inner, outer, params, problem.hparams)
    got = HyperGradient("implicit-exact", **FD).compute(inner, outer, params, problem.hparams)
    assert rel_error(got, reference) < 1e-7
