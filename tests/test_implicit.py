"""Implicit modes against exact hypergradients (closed-form ridge, Newton-solved logistic)."""

import warnings

import pytest
import torch

import bilevel
from bilevel import HyperGradient, HypergradientWarning, SolverBreakdownError

from problems import logistic, rel_error, ridge, saddle, singular

IMPLICIT = ["implicit-exact", "implicit-cg", "implicit-neumann", "implicit-nystrom"]


def test_registry_lists_the_implicit_modes():
    assert set(IMPLICIT + ["implicit-identity"]) <= set(bilevel.available_modes())


def test_exact_matches_closed_form_ridge(device):
    problem = ridge(device=device)
    hg = HyperGradient("implicit-exact")
    grad = hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert rel_error(grad, problem.exact_hypergradient()) < 1e-10
    assert hg.stats.mode == "implicit-exact" and hg.stats.hvps == 6 and hg.stats.converged


def test_exact_includes_the_direct_term(device):
    problem = ridge(device=device, outer_uses_hparams=True)
    grad = HyperGradient("implicit-exact").compute(
        problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams
    )
    assert rel_error(grad, problem.exact_hypergradient()) < 1e-10


def test_cg_with_p_iterations_matches_exact(device):
    problem = ridge(p=12, device=device)
    hg = HyperGradient("implicit-cg", iters=12, tol=0.0)
    grad = hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert rel_error(grad, problem.exact_hypergradient()) < 1e-8
    assert hg.stats.hvps <= 12 + 1 and hg.stats.residual < 1e-8 and hg.stats.converged  # + the true residual


def test_nystrom_full_rank_matches_exact():
    problem = ridge(p=8)
    hg = HyperGradient("implicit-nystrom", rank=8, rho=1e-9)
    grad = hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert rel_error(grad, problem.exact_hypergradient()) < 1e-6
    assert hg.stats.hvps == 8 + 1 and not hg.stats.singular  # the columns and the residual
    assert hg.stats.converged and hg.stats.residual < 1e-6


def test_nystrom_rank_is_capped_and_low_rank_is_an_approximation():
    problem = ridge(p=8)
    exact = problem.exact_hypergradient()
    hg = HyperGradient("implicit-nystrom", rank=100, rho=1e-9)
    hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert hg.stats.hvps == 8 + 1  # the capped rank and the residual
    low = HyperGradient("implicit-nystrom", rank=3, rho=0.1).compute(
        problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams
    )
    assert rel_error(low, exact) > 1e-3 and bool(torch.isfinite(low).all())
    hg = HyperGradient("implicit-nystrom", rank=3, rho=0.1)
    with pytest.warns(HypergradientWarning, match="stopped above its tolerance"):
        hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert hg.stats.converged is False and hg.stats.residual > 1e-3


def test_errors_shrink_with_budget():
    problem = ridge(p=10, n=25)
    exact = problem.exact_hypergradient()
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    neumann = [
        rel_error(HyperGradient("implicit-neumann", iters=k).compute(*args), exact) for k in (2, 8, 32, 128)
    ]
    cg = [
        rel_error(HyperGradient("implicit-cg", iters=k, tol=0.0).compute(*args), exact) for k in (1, 3, 6, 9)
    ]
    assert all(a > b for a, b in zip(neumann, neumann[1:])), neumann
    assert all(a > b for a, b in zip(cg, cg[1:])), cg
    assert neumann[-1] < 1e-6 and cg[-1] < 1e-3


@pytest.mark.parametrize("residual", [True, False])
def test_neumann_with_explicit_alpha_is_the_truncated_series(residual):
    """x = α Σ_{j<K} (I − αH)^j v, checked against the dense formula; ``residual=False``
    gives the same sum with one product fewer and no residual."""
    problem = ridge(p=5)
    theta = problem.params_star()
    lam = problem.hparams
    hess = torch.autograd.functional.hessian(lambda w: problem.inner_loss(w, lam), theta.detach())
    v = torch.autograd.grad(problem.outer_loss(theta, lam), theta)[0]
    alpha, k = 0.3, 7
    step = torch.eye(5, dtype=hess.dtype) - alpha * hess
    x = alpha * sum(torch.linalg.matrix_power(step, j) @ v for j in range(k))
    mixed = torch.autograd.functional.jacobian(
        lambda l: torch.autograd.grad(problem.inner_loss(theta, l), theta, create_graph=True)[0], lam.detach()
    )
    expected = -(mixed.T @ x)
    hg = HyperGradient("implicit-neumann", iters=k, alpha=alpha, residual=residual)
    grad = hg.compute(problem.inner_loss, problem.outer_loss, theta, lam)
    assert rel_error(grad, expected) < 1e-12
    if not residual:
        assert hg.stats.hvps == k - 1 and hg.stats.residual is None and hg.stats.converged is None
        assert not hg.stats.diverged
        return
    assert hg.stats.hvps == k
    residual = float((v - hess @ x).norm() / v.norm())
    assert hg.stats.residual == pytest.approx(residual, rel=1e-8)


def test_logistic_regression_all_implicit_modes(device):
    problem = logistic(device=device)
    exact = problem.exact_hypergradient()
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert rel_error(HyperGradient("implicit-exact").compute(*args), exact) < 1e-9
    assert rel_error(HyperGradient("implicit-cg", tol=1e-12).compute(*args), exact) < 1e-8
    assert rel_error(HyperGradient("implicit-nystrom", rank=5, rho=1e-10).compute(*args), exact) < 1e-6
    assert rel_error(HyperGradient("implicit-neumann", iters=400).compute(*args), exact) < 1e-6


def test_identity_mode_is_the_first_neumann_term():
    problem = ridge(p=5)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    identity = HyperGradient("implicit-identity", alpha=0.2)
    one_term = HyperGradient("implicit-neumann", iters=1, alpha=0.2).compute(*args)
    with pytest.warns(HypergradientWarning, match="stopped above its tolerance"):
        assert rel_error(identity.compute(*args), one_term) < 1e-14
    assert identity.stats.hvps == 1 and identity.stats.converged is False  # the residual product
    silent = HyperGradient("implicit-identity", alpha=0.2, residual=False)
    silent.compute(*args)
    assert silent.stats.hvps == 0 and silent.stats.converged is None


def test_backward_accumulates_like_loss_backward():
    problem = ridge()
    expected = problem.exact_hypergradient()
    hg = HyperGradient("implicit-exact")
    theta = problem.params_star()
    hg.backward(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    assert rel_error(problem.hparams.grad, expected) < 1e-10
    hg.backward(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    assert rel_error(problem.hparams.grad, 2 * expected) < 1e-10
    assert theta.grad is None


def test_backward_through_a_computed_hparam_reaches_its_leaf():
    """hparams λ = 2·raw (a non-leaf): backward puts dg/draw = 2·dg/dλ in raw.grad, as
    loss.backward() would (before, it wrote λ.grad and raw never moved)."""
    problem = ridge()
    expected = problem.exact_hypergradient()
    raw = (problem.hparams.detach() / 2).requires_grad_()
    lam = 2 * raw
    HyperGradient("implicit-exact").backward(
        problem.inner_loss, problem.outer_loss, problem.params_star(), lam
    )
    assert raw.grad is not None and rel_error(raw.grad, 2 * expected) < 1e-10


def test_result_is_detached_and_inputs_untouched():
    problem = ridge()
    theta = problem.params_star()
    before = (theta.detach().clone(), problem.hparams.detach().clone())
    grad = HyperGradient("implicit-cg").compute(
        problem.inner_loss, problem.outer_loss, theta, problem.hparams
    )
    assert not grad.requires_grad
    assert torch.equal(theta, before[0]) and torch.equal(problem.hparams, before[1])
    assert theta.grad is None and problem.hparams.grad is None
    assert theta.requires_grad and problem.hparams.requires_grad


def test_stats_report_what_the_call_did():
    problem = ridge(p=10)
    hg = HyperGradient("implicit-cg", iters=3, tol=0.0)
    hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    stats = hg.stats
    assert (stats.mode, stats.hvps, stats.iters) == ("implicit-cg", 3, 3)
    assert stats.residual > 1e-6 and stats.converged is False
    assert stats.wall_time > 0 and not stats.negative_curvature
    assert set(stats.as_dict()) >= {
        "mode",
        "hvps",
        "residual",
        "converged",
        "negative_curvature",
        "wall_time",
    }


def test_cg_negative_curvature_is_reported_and_warned_once():
    inner, outer, theta, phi = saddle()  # f = ½ wᵀ diag(1, −1) w − φᵀw at w = (φ₀, −φ₁)
    hg = HyperGradient("implicit-cg")
    with pytest.warns(HypergradientWarning, match="negative curvature"):
        hg.compute(inner, outer, theta, phi)
    assert hg.stats.negative_curvature and not hg.stats.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg.compute(inner, outer, theta, phi)  # second time: no warning
    with pytest.raises(SolverBreakdownError, match="negative curvature"):
        HyperGradient("implicit-cg", strict=True).compute(inner, outer, theta, phi)
    # the exact solve handles indefinite (invertible) Hessians: dθ*/dφ = diag(1, -1)
    exact = HyperGradient("implicit-exact").compute(inner, outer, theta, phi)
    assert torch.allclose(exact, torch.tensor([2.0, 4.0], dtype=torch.float64))


def test_neumann_divergence_is_reported():
    problem = ridge()
    hg = HyperGradient("implicit-neumann", iters=30, alpha=10.0)
    with pytest.warns(HypergradientWarning, match="diverged"):
        hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert hg.stats.diverged and hg.stats.residual > 1.0


def test_exact_flags_a_numerically_singular_hessian_and_solves_an_ill_conditioned_one():
    """H = Q diag(s, 1, …, 5) Qᵀ: with s = 0 rounding leaves an eigenvalue near 1e-16, where
    LU succeeds with a tiny residual but a solution of ~1e16; the condition test flags it and
    returns the least-squares solution. With s = 1e-10 (cond 5e10) H is invertible in float64:
    no flag, and the solve matches the closed form Bᵀ H⁻¹ (w − c)."""
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    b, c = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    phi = torch.randn(2, dtype=torch.float64, requires_grad=True)
    outer = lambda w, p: 0.5 * ((w - c) ** 2).sum()
    for smallest in (0.0, 1e-10):
        hess = q @ torch.diag(torch.tensor([smallest, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)) @ q.T
        inner = lambda w, p: 0.5 * w @ hess @ w - w @ (b @ p)
        w = torch.randn(6, dtype=torch.float64, requires_grad=True)
        hg = HyperGradient("implicit-exact")
        if smallest == 0.0:
            with pytest.warns(HypergradientWarning, match="singular"):
                grad = hg.compute(inner, outer, w, phi)
            assert hg.stats.singular and not hg.stats.converged
            expected = b.T @ torch.linalg.pinv(hess, hermitian=True, rtol=1e-12) @ (w.detach() - c)
            assert float(grad.norm()) < 1e3 and rel_error(grad, expected) < 1e-6
        else:
            grad = hg.compute(inner, outer, w, phi)
            assert not hg.stats.singular and hg.stats.converged
            expected = b.T @ torch.linalg.solve(hess, w.detach() - c)
            assert rel_error(grad, expected) < 1e-5


def test_neumann_on_an_indefinite_hessian_names_the_cause_alpha_cannot_fix():
    """H = diag(2, −1): alpha='auto' takes 1/λmax = 0.5, and the −1 direction grows by 1.5
    per term; the warning must not only blame alpha, which is already automatic."""
    hess = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    inner = lambda w, p: 0.5 * w @ hess @ w - w @ p
    outer = lambda w, p: ((w - 1) ** 2).sum()
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    phi = torch.ones(2, dtype=torch.float64, requires_grad=True)
    hg = HyperGradient("implicit-neumann")
    with pytest.warns(HypergradientWarning, match="indefinite.*implicit-exact"):
        hg.compute(inner, outer, w, phi)
    assert hg.stats.diverged and hg.stats.extra["alpha"] == pytest.approx(0.5)


def test_singular_hessian_is_reported():
    """f = ½(w₀ + w₁)² + φ·w₀: H = [[1, 1], [1, 1]] is singular."""
    inner, outer, theta, phi = singular()
    for mode, options in [("implicit-exact", {}), ("implicit-nystrom", {"rank": 2, "rho": 1e-3})]:
        hg = HyperGradient(mode, **options)
        with pytest.warns(HypergradientWarning, match="singular"):
            hg.compute(inner, outer, theta, phi)
        assert hg.stats.singular


def test_hparam_unused_by_inner_gets_only_its_direct_term():
    problem = ridge(p=4)
    extra = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    inner = lambda w, h: problem.inner_loss(w, h["lam"])
    outer = lambda w, h: problem.outer_loss(w, h["lam"]) + h["extra"] ** 2
    grads = HyperGradient("implicit-exact").compute(
        inner, outer, problem.params_star(), {"lam": problem.hparams, "extra": extra}
    )
    assert rel_error(grads["lam"], problem.exact_hypergradient()) < 1e-10
    assert float(grads["extra"]) == pytest.approx(1.4)


def test_no_hparam_in_inner_warns_direct_term_only():
    problem = ridge(p=4)
    phi = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    outer = lambda w, h: problem.outer_loss(w, None) + h**2
    hg = HyperGradient("implicit-cg")
    with pytest.warns(HypergradientWarning, match="only the direct term"):
        grad = hg.compute(
            lambda w, h: problem.inner_loss(w, problem.hparams.detach()), outer, problem.params_star(), phi
        )
    assert float(grad) == pytest.approx(1.0)


def test_param_unused_by_outer_loss_gives_zero_contribution():
    problem = ridge(p=4)
    spare = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    inner = lambda ps, lam: problem.inner_loss(ps[0], lam) + 0.5 * (ps[1] ** 2).sum()
    outer = lambda ps, lam: problem.outer_loss(ps[0], lam)
    grad = HyperGradient("implicit-cg", tol=1e-12).compute(
        inner, outer, (problem.params_star(), spare), problem.hparams
    )
    assert rel_error(grad, problem.exact_hypergradient()) < 1e-9


def test_warm_start_reaches_the_answer_with_fewer_products():
    problem = ridge(p=12, n=30)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    hg = HyperGradient("implicit-cg", tol=1e-10, warm_start=True)
    first = hg.compute(*args)
    cold_products = hg.stats.hvps
    second = hg.compute(*args)
    assert hg.stats.hvps < cold_products
    assert rel_error(second, first) < 1e-8
    restored = HyperGradient("implicit-cg", tol=1e-10, warm_start=True)
    restored.load_state_dict(hg.state_dict())
    third = hg.compute(*args)
    assert torch.equal(restored.compute(*args), third) and restored.stats.hvps == hg.stats.hvps
    cold = HyperGradient("implicit-cg", tol=1e-10)  # warm_start=False ignores a loaded start
    cold.load_state_dict(hg.state_dict())
    cold.compute(*args)
    assert cold.stats.hvps == cold_products


def test_nystrom_generator_makes_runs_reproducible_and_resumable():
    problem = ridge(p=10)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    a, b = (
        HyperGradient("implicit-nystrom", rank=4, generator=3),
        HyperGradient("implicit-nystrom", rank=4, generator=3),
    )
    assert torch.equal(a.compute(*args), b.compute(*args))
    state = a.state_dict()
    next_a = a.compute(*args)
    b.compute(*args)
    assert not torch.equal(next_a, b.compute(*args))  # b is now two draws ahead of the state
    b.load_state_dict(state)
    assert torch.equal(b.compute(*args), next_a)


def test_gmres_solves_random_nonsymmetric_systems():
    from bilevel.solvers import gmres

    g = torch.Generator().manual_seed(0)
    for n in (3, 10, 25):
        a = (
            torch.eye(n, dtype=torch.float64) * 3
            + torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
        )
        v = (
            torch.randn(n, generator=g, dtype=torch.float64),
            torch.randn(2, generator=g, dtype=torch.float64),
        )
        big = torch.block_diag(a, torch.tensor([[2.0, 1.0], [-1.0, 2.0]], dtype=torch.float64))
        matvec = lambda x: tuple(t for t in torch.split(big @ torch.cat(x), [n, 2]))
        result = gmres(matvec, v, iters=n + 2, tol=1e-13)
        expected = torch.linalg.solve(big, torch.cat(v))
        assert torch.allclose(torch.cat(result.x), expected, rtol=1e-10, atol=1e-12)
        assert result.converged and result.products <= n + 3  # and the residual product
    partial = gmres(matvec, v, iters=3, tol=0.0)
    assert partial.products == 3 and 0 < partial.residual < 1 and not partial.converged


def test_gmres_mode_matches_exact_on_ridge():
    problem = ridge(p=8)
    hg = HyperGradient("implicit-gmres", tol=1e-12)
    grad = hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert (
        rel_error(grad, problem.exact_hypergradient()) < 1e-9 and hg.stats.hvps <= 8 + 1
    )  # and the residual product
