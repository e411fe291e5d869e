"""The finite-difference helpers, and every implicit mode checked with them on non-quadratic problems."""
import pytest
import torch

from bilevel import HyperGradient
from bilevel.testing import assert_hypergradient_close, finite_difference_hypergradient
from problems import logistic, ridge


def test_fd_matches_analytic_derivative_for_each_scheme():
    # F(φ) = outer(θ*(φ)) with θ* = φ² and g = Σ sin(θ): dF/dφ = cos(φ²)·2φ
    phi = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    expected = torch.cos(phi ** 2) * 2 * phi
    for scheme, tol in (("forward", 1e-6), ("central", 1e-9), ("five-point", 1e-11)):
        fd = finite_difference_hypergradient(lambda h: h ** 2, lambda w, h: torch.sin(w).sum(), phi,
                                             scheme=scheme)
        assert torch.allclose(fd, expected, atol=tol), scheme
    assert torch.equal(phi, torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64))


def test_fd_keeps_structures_and_takes_directions():
    hp = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor(0.5, dtype=torch.float64)}
    solve = lambda h: h["a"] * h["b"]
    outer = lambda w, h: (w ** 2).sum() + h["b"]
    fd = finite_difference_hypergradient(solve, outer, hp)
    assert set(fd) == {"a", "b"}
    assert torch.allclose(fd["a"], 2 * hp["a"] * hp["b"] ** 2, atol=1e-9)
    assert torch.allclose(fd["b"], 2 * hp["b"] * (hp["a"] ** 2).sum() + 1, atol=1e-9)
    d = {"a": torch.tensor([1.0, -1.0], dtype=torch.float64), "b": torch.tensor(2.0, dtype=torch.float64)}
    directional = finite_difference_hypergradient(solve, outer, hp, direction=d)
    assert directional.shape == () and torch.allclose(
        directional, (fd["a"] * d["a"]).sum() + fd["b"] * d["b"], atol=1e-8)
    random_dir = finite_difference_hypergradient(solve, outer, hp, direction="random",
                                                 generator=torch.Generator().manual_seed(0))
    assert random_dir.shape == ()


def test_fd_warns_in_float32_and_checks_scheme():
    phi = torch.tensor([0.5])
    with pytest.warns(UserWarning, match="noisy"):
        finite_difference_hypergradient(lambda h: h, lambda w, h: (w ** 2).sum(), phi)
    with pytest.raises(ValueError, match="scheme must be one of"):
        finite_difference_hypergradient(lambda h: h, lambda w, h: w.sum(), phi.double(), scheme="backward")


def test_assert_passes_for_a_correct_mode_and_reports_a_wrong_one():
    problem = ridge(p=5)
    computed, fd = assert_hypergradient_close("implicit-exact", problem.inner_loss, problem.outer_loss,
                                              problem.inner_solve, problem.hparams, rtol=1e-7)
    assert torch.allclose(computed, fd, rtol=1e-6)
    wrong = HyperGradient("implicit-identity", alpha=0.01)
    with pytest.raises(AssertionError) as info:
        assert_hypergradient_close(wrong, problem.inner_loss, problem.outer_loss, problem.inner_solve,
                                   problem.hparams)
    report = str(info.value)
    for piece in ("implicit-identity", "relative error", "cosine", "worst entries", "hparams[", "central"):
        assert piece in report
    assert problem.hparams.grad is None


def test_assert_along_a_direction():
    problem = ridge(p=5)
    direction = torch.linspace(-1, 1, 5, dtype=torch.float64)
    computed, fd = assert_hypergradient_close("implicit-cg", problem.inner_loss, problem.outer_loss,
                                              problem.inner_solve, problem.hparams, direction=direction)
    assert computed.shape == () == fd.shape


@pytest.mark.parametrize("mode, options", [
    ("implicit-exact", {}), ("implicit-cg", {"tol": 1e-12}), ("implicit-nystrom", {"rank": 5, "rho": 1e-10}),
    ("implicit-neumann", {"iters": 400})])
def test_modes_against_fd_on_logistic_regression(mode, options):
    problem = logistic()
    assert_hypergradient_close(HyperGradient(mode, **options), problem.inner_loss, problem.outer_loss,
                               problem.inner_solve, problem.hparams, rtol=1e-6)


def _mlp_problem():
    """A 1-hidden-layer tanh MLP (P = 3·4 + 4 + 4 + 1 = 21) with per-layer log weight decay,
    solved by L-BFGS then Newton's method in float64 to machine precision."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    xv = torch.randn(30, 3, generator=g, dtype=torch.float64)
    yv = torch.sin(2 * xv[:, :1])
    shapes = [(3, 4), (4,), (4, 1), (1,)]
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    start = torch.randn(sum(sizes), generator=g, dtype=torch.float64) * 0.5

    def unpack(flat):
        return tuple(t.reshape(s) for t, s in zip(flat.split(sizes), shapes))

    def predict(ws, inputs):
        return torch.tanh(inputs @ ws[0] + ws[1]) @ ws[2] + ws[3]

    def inner_loss(ws, lam):
        penalty = sum(l.exp() * (w ** 2).sum() for l, w in zip(lam, ws))
        return ((predict(ws, x) - y) ** 2).mean() + 0.5 * penalty

    def outer_loss(ws, lam):
        return ((predict(ws, xv) - yv) ** 2).mean()

    def inner_solve(lam):
        f = lambda v: inner_loss(unpack(v), lam)
        flat = start.clone().requires_grad_()
        opt = torch.optim.LBFGS([flat], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = f(flat)
                loss.backward()
            return loss

        opt.step(closure)  # into the basin of a minimum, then Newton to machine precision
        flat = flat.detach()
        for _ in range(5):
            grad = torch.func.grad(f)(flat)
            hess = torch.func.hessian(f)(flat)
            flat = flat - torch.linalg.solve(hess, grad)
        return unpack(flat)

    lam = torch.tensor([-3.0, -4.0, -3.0, -4.0], dtype=torch.float64, requires_grad=True)
    return inner_loss, outer_loss, inner_solve, lam


@pytest.mark.parametrize("mode, options", [
    ("implicit-exact", {}), ("implicit-cg", {"tol": 1e-12, "iters": 100}),
    ("implicit-nystrom", {"rank": 21, "rho": 1e-10})])
def test_modes_against_fd_on_a_small_mlp(mode, options):
    inner_loss, outer_loss, inner_solve, lam = _mlp_problem()
    assert_hypergradient_close(HyperGradient(mode, **options), inner_loss, outer_loss, inner_solve, lam,
                               rtol=1e-5)
