"""Custom optimality conditions: ``bilevel.Root(F)`` and ``bilevel.FixedPoint(T)`` where
``inner_loss`` goes, against closed forms (a lasso by proximal gradient, a non-negative
least squares by projected gradient), the usual inner-loss result, and the refusals."""

import pytest
import torch
from torch import nn

import bilevel
from bilevel import FixedPoint, HyperGradient, Root
from bilevel.testing import assert_hypergradient_close

D = torch.float64
N, P, M = 60, 8, 40


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, P, generator=g, dtype=D)
    w = torch.tensor([1.5, -2.0, 0.0, 0.05, 0.8, 0.0, -0.5, -0.03], dtype=D)
    y = X @ w + 0.3 * torch.randn(N, generator=g, dtype=D)
    Xv = torch.randn(M, P, generator=g, dtype=D)
    yv = Xv @ w + 0.3 * torch.randn(M, generator=g, dtype=D)
    return X, y, Xv, yv


X, Y, XV, YV = _data()
A, B = X.T @ X / N, X.T @ Y / N  # loss ½‖Xθ − y‖²/n: gradient Aθ − b
ETA = 1.0 / float(torch.linalg.eigvalsh(A).max())


def outer(w, h):
    return 0.5 * ((XV @ w - YV) ** 2).mean()


def outer_gradient(w):
    return XV.T @ (XV @ w - YV) / M


# ------------------------------------------------------------------ lasso: ½‖Xθ−y‖²/n + φ‖θ‖₁
def prox_step(w, lam):
    """T(θ, φ) = soft_threshold(θ − η∇loss(θ), η·φ)."""
    z = w - ETA * (X.T @ (X @ w - Y) / N)
    return torch.sign(z) * torch.relu(z.abs() - ETA * lam)


def lasso_solve(lam):
    """θ*(φ): proximal gradient to its support, then the closed form on it,
    θ_S = (X_SᵀX_S)⁻¹(X_Sᵀy − n·φ·s_S)."""
    w = torch.zeros(P, dtype=D)
    with torch.no_grad():
        for _ in range(3000):
            w = prox_step(w, lam)
        support, signs = w != 0, torch.sign(w)
        xs = X[:, support]
        theta = torch.zeros(P, dtype=D)
        theta[support] = torch.linalg.solve(xs.T @ xs, xs.T @ Y - N * lam * signs[support])
    return theta


def lasso_closed_form(lam):
    """dg/dφ = ∇_S gᵀ dθ_S/dφ with dθ_S/dφ = −n (X_SᵀX_S)⁻¹ s_S."""
    theta = lasso_solve(lam)
    support = theta != 0
    xs = X[:, support]
    dtheta = -N * torch.linalg.solve(xs.T @ xs, torch.sign(theta[support]))
    return theta, outer_gradient(theta)[support] @ dtheta


@pytest.fixture(scope="module")
def lasso():
    lam = torch.tensor(0.08, dtype=D)
    theta, expected = lasso_closed_form(lam)
    support = theta != 0
    assert 2 <= int(support.sum()) <= P - 2  # a real support, some coordinates at zero
    margin = lam - (X.T @ (X @ theta - Y) / N)[~support].abs()
    assert float(margin.min()) > 1e-3  # strict complementarity: the support is stable
    assert float((prox_step(theta, lam) - theta).abs().max()) < 1e-13  # a fixed point of T
    assert abs(float(expected)) > 1e-3
    return theta, lam, expected


LASSO_MODES = [
    ("implicit-gmres", {"tol": 1e-13}),
    ("implicit-neumann", {"iters": 300, "tol": 1e-12}),
    ("implicit-exact", {}),
    ("unroll", {"steps": 300}),
    ("truncated-unroll", {"steps": 320, "truncate": 300}),
]


@pytest.mark.parametrize("mode, options", LASSO_MODES)
def test_lasso_through_the_fixed_point_equals_its_closed_form(lasso, mode, options):
    theta, lam, expected = lasso
    params, hparams = theta.clone().requires_grad_(), lam.clone().requires_grad_()
    hg = HyperGradient(mode, strict=True, **options)
    got = hg.compute(FixedPoint(prox_step), outer, params, hparams)
    assert abs(float(got) - float(expected)) <= 1e-8 * max(1.0, abs(float(expected))), (mode, got, expected)
    assert torch.equal(params.detach(), theta)  # params untouched


def test_an_unrolled_fixed_point_from_elsewhere_converges_and_can_update_params(lasso):
    """From θ_0 = 0 the first steps converge, the last ones carry the derivative; with
    update_params the final iterate is written back."""
    theta, lam, expected = lasso
    params, hparams = torch.zeros(P, dtype=D, requires_grad=True), lam.clone().requires_grad_()
    hg = HyperGradient("truncated-unroll", steps=600, truncate=300, update_params=True, measure_memory=True)
    got = hg.compute(FixedPoint(prox_step), outer, params, hparams)
    assert abs(float(got) - float(expected)) <= 1e-8 * abs(float(expected))
    torch.testing.assert_close(params.detach(), theta, rtol=0, atol=1e-12)
    assert hg.stats.iters == 600 and hg.stats.extra["graph_steps"] == 300
    assert hg.stats.extra["saved_bytes_peak"] > 0


def test_backward_and_bilevel_testing_take_a_fixed_point(lasso):
    theta, lam, expected = lasso
    hparams = lam.clone().requires_grad_()
    HyperGradient("implicit-exact").backward(
        FixedPoint(prox_step), outer, theta.clone().requires_grad_(), hparams
    )
    assert abs(float(hparams.grad) - float(expected)) <= 1e-8 * abs(float(expected))
    computed, fd = assert_hypergradient_close(
        HyperGradient("implicit-gmres", tol=1e-13), FixedPoint(prox_step), outer, lasso_solve, lam
    )
    assert abs(float(computed) - float(fd)) < 1e-8
    wrong = FixedPoint(lambda w, h: prox_step(w, 2 * h))  # not the map lasso_solve solves
    with pytest.raises(AssertionError, match=r"‖params − T\(params, hparams\)‖ at inner_solve"):
        assert_hypergradient_close("implicit-exact", wrong, outer, lasso_solve, lam)


# --------------------------------------------- NNLS: ½‖Xθ−y‖²/n + ½Σφᵢθᵢ², θ ≥ 0, φ per entry
PHI = torch.full((P,), 0.05, dtype=D)
ETA_NN = 1.0 / float(torch.linalg.eigvalsh(A + torch.diag(PHI)).max())


def projected_step(w, phi):
    """T(θ, φ) = max(θ − η∇f(θ, φ), 0)."""
    return torch.relu(w - ETA_NN * (A @ w - B + phi * w))


@pytest.fixture(scope="module")
def nnls():
    """θ* by projected gradient, polished in closed form on the free set F (θ_F > 0):
    (A_FF + diag φ_F) θ_F = b_F; the hypergradient, for j ∈ F, is −θ_j [(A_FF + diag φ_F)⁻¹ ∇_F g]_j
    (0 on the active set)."""
    w = torch.zeros(P, dtype=D)
    for _ in range(5000):
        w = projected_step(w, PHI)
    free = w > 0
    system = (A + torch.diag(PHI))[free][:, free]
    theta = torch.zeros(P, dtype=D)
    theta[free] = torch.linalg.solve(system, B[free])
    assert 2 <= int(free.sum()) <= P - 2
    assert float((A @ theta - B + PHI * theta)[~free].min()) > 1e-3  # strictly active
    expected = torch.zeros(P, dtype=D)
    expected[free] = -theta[free] * torch.linalg.solve(system, outer_gradient(theta)[free])
    assert float((projected_step(theta, PHI) - theta).abs().max()) < 1e-13
    return theta, expected


@pytest.mark.parametrize("mode, options", LASSO_MODES)
def test_nnls_through_the_projected_step_equals_its_closed_form(nnls, mode, options):
    theta, expected = nnls
    hg = HyperGradient(mode, strict=True, **options)
    got = hg.compute(
        FixedPoint(projected_step), outer, theta.clone().requires_grad_(), PHI.clone().requires_grad_()
    )
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ roots, modules, structures
def ridge_gradient(w, lam):
    return X.T @ (X @ w - Y) / N + lam.exp() * w


def ridge_loss(w, lam):
    return 0.5 * ((X @ w - Y) ** 2).mean() + 0.5 * (lam.exp() * w**2).sum()


@pytest.fixture(scope="module")
def ridge():
    lam = torch.linspace(-3.0, -1.0, P, dtype=D).requires_grad_()
    theta = torch.linalg.solve(A + torch.diag(lam.detach().exp()), B).requires_grad_()
    reference = HyperGradient("implicit-exact").compute(ridge_loss, outer, theta, lam)
    return theta, lam, reference


@pytest.mark.parametrize("mode", ["implicit-exact", "implicit-gmres", "implicit-cg"])
def test_a_root_of_the_gradient_equals_the_inner_loss_result(ridge, mode):
    theta, lam, reference = ridge
    options = {} if mode == "implicit-exact" else {"tol": 1e-13}
    symmetric = mode == "implicit-cg"  # declared symmetric: the modes for symmetric systems apply
    got = HyperGradient(mode, **options).compute(Root(ridge_gradient, symmetric=symmetric), outer, theta, lam)
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-13)


def test_module_params_bound_and_dicts_in_any_order(ridge):
    """A module as params: T receives it bound to the point of evaluation and returns a name ->
    tensor dict (here built in reverse order, and from autograd.grad with create_graph=True)."""
    _, lam, _ = ridge
    model = nn.Linear(P, 1).double()
    inner = lambda m, h: 0.5 * ((m(X).squeeze(1) - Y) ** 2).mean() + 0.5 * (h.exp() * m.weight[0] ** 2).sum()
    model_outer = lambda m, h: 0.5 * ((m(XV).squeeze(1) - YV) ** 2).mean()
    with torch.no_grad():  # θ* in closed form: the bias is not regularised
        features = torch.cat([X, torch.ones(N, 1, dtype=D)], 1)
        penalty = torch.diag(torch.cat([lam.detach().exp(), torch.zeros(1, dtype=D)]))
        solution = torch.linalg.solve(features.T @ features / N + penalty, features.T @ Y / N)
        model.weight.copy_(solution[:P].reshape(1, P))
        model.bias.copy_(solution[P:])
    reference = HyperGradient("implicit-exact").compute(inner, model_outer, model, lam)

    def step(m, h):
        named = dict(m.named_parameters())
        grads = torch.autograd.grad(inner(m, h), list(named.values()), create_graph=True)
        return {n: p - 0.5 * g for (n, p), g in reversed(list(zip(named.items(), grads)))}

    for mode in ("implicit-exact", HyperGradient("implicit-gmres", tol=1e-13)):
        hg = mode if isinstance(mode, HyperGradient) else HyperGradient(mode)
        got = hg.compute(FixedPoint(step), model_outer, model, lam)
        torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)
    bad = FixedPoint(lambda m, h: {"weight": m.weight})
    with pytest.raises(ValueError, match=r"FixedPoint\(T\): T must return the structure of params"):
        HyperGradient("implicit-exact").compute(bad, model_outer, model, lam)
    with pytest.raises(TypeError, match=r"Root\(F\): F must be a callable"):
        Root(3)


# ----------------------------------------------------------------------------------- refusals
def test_modes_that_cannot_solve_the_system_refuse_naming_those_that_can(lasso, ridge):
    theta, lam, _ = lasso
    params, hparams = theta.clone().requires_grad_(), lam.clone().requires_grad_()
    fixed = FixedPoint(prox_step)
    for mode in ("implicit-cg", "implicit-minres", "implicit-nystrom", "penalty"):
        with pytest.raises(ValueError, match="symmetric inner Hessian") as error:
            HyperGradient(mode).compute(fixed, outer, params, hparams)
        assert all(m in str(error.value) for m in ("implicit-gmres", "implicit-neumann", "implicit-exact"))
    for mode in ("unroll", "truncated-unroll"):
        with pytest.raises(ValueError, match="no iteration to unroll.*implicit-exact.*FixedPoint"):
            HyperGradient(mode).compute(Root(ridge_gradient), outer, *ridge[:2])
    with pytest.raises(ValueError, match="no iteration to unroll.*implicit-cg"):
        HyperGradient("unroll").compute(Root(ridge_gradient, symmetric=True), outer, *ridge[:2])
    with pytest.raises(ValueError, match="stationarity map of its own; use an implicit mode"):
        HyperGradient("penalty").compute(Root(ridge_gradient, symmetric=True), outer, *ridge[:2])
    with pytest.raises(ValueError, match="stationarity map is not a gradient.*use hvp='autograd'"):
        HyperGradient("implicit-gmres", hvp="finite-difference").compute(fixed, outer, params, hparams)
    with pytest.raises(ValueError, match="has none.*bilevel.Root.*use hvp='autograd'"):
        HyperGradient("implicit-cg", hvp="finite-difference").compute(
            Root(ridge_gradient, symmetric=True), outer, *ridge[:2]
        )
    for options in ({"lr": 0.5}, {"momentum": 0.9}, {"inner_optimizer": torch.optim.Adam}, {"checkpoint": 2}):
        with pytest.raises(ValueError, match="unrolls θ ← T\\(θ, φ\\) itself.*do not apply"):
            HyperGradient("unroll", steps=4, **options).compute(fixed, outer, params, hparams)
    with pytest.raises(ValueError, match="same tensor"):  # the init as a hyperparameter: not for T
        HyperGradient("unroll").compute(fixed, outer, params, params)
    assert bilevel.Root is Root and bilevel.FixedPoint is FixedPoint


# ------------------------------------------------------------------------ the README's recipe
def test_readme_recipe_a_lasso_through_fixed_point():
    import torch

    import bilevel

    torch.manual_seed(0)
    X, y = torch.randn(60, 8, dtype=torch.float64), torch.randn(60, dtype=torch.float64)
    Xv, yv = torch.randn(40, 8, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    step = 1 / torch.linalg.eigvalsh(X.T @ X / 60).max()

    def prox_step(w, lam):  # one proximal-gradient step of ½‖Xw − y‖²/n + λ‖w‖₁
        z = w - step * X.T @ (X @ w - y) / 60
        return z.sign() * torch.relu(z.abs() - step * lam)

    lam = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    w = torch.zeros(8, dtype=torch.float64)
    for _ in range(2000):  # solve the inner problem (any solver will do)
        w = prox_step(w, lam.detach())
    w.requires_grad_()
    val_loss = lambda w, lam: 0.5 * ((Xv @ w - yv) ** 2).mean()
    hg = bilevel.HyperGradient("implicit-gmres", tol=1e-10)
    hg.backward(bilevel.FixedPoint(prox_step), val_loss, w, lam)  # lam.grad = d val_loss / d lam

    # the check: on the support S, dw_S/dlam = −n (X_SᵀX_S)⁻¹ sign(w_S)
    s = w.detach() != 0
    dw = -60 * torch.linalg.solve(X[:, s].T @ X[:, s], w.detach()[s].sign())
    expected = (Xv.T @ (Xv @ w.detach() - yv) / 40)[s] @ dw
    assert 0 < int(s.sum()) < 8 and abs(float(lam.grad - expected)) < 1e-8
