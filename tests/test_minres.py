"""MINRES (``bilevel._src.solvers.minres`` and ``implicit-minres``) against dense solves."""

import warnings

import pytest
import torch

import bilevel
from bilevel import HyperGradient
from bilevel._src.solvers import minres
from bilevel.errors import NonFiniteError

from problems import rel_error, saddle, symmetric_system

f64 = torch.float64
INDEFINITE = [3.0, 2.0, 1.0, 0.5, -0.2, 0.1, 1.5, 2.5, -1.0, -3.0, 0.01, -0.05]
SINGULAR = [3.0, 2.0, 0.0, -1.0, 0.5, 0.0, -2.0, 1.0]  # two zero eigenvalues


def test_minres_solves_an_indefinite_system_to_the_dense_solution():
    matrix, matvec, v = symmetric_system(INDEFINITE)
    b = torch.cat(v)
    result = minres(matvec, v, 100, tol=1e-13)
    assert result.converged and result.breakdown is None
    assert rel_error(torch.cat(result.x), torch.linalg.solve(matrix, b)) < 1e-8
    assert result.products == result.iters + 1  # and one product measures the residual
    assert result.residual == pytest.approx(float((b - matrix @ torch.cat(result.x)).norm() / b.norm()))
    shifted = matrix + 0.3 * torch.eye(len(INDEFINITE), dtype=f64)
    damped = minres(matvec, v, 100, tol=1e-13, damping=0.3)
    assert rel_error(torch.cat(damped.x), torch.linalg.solve(shifted, b)) < 1e-8
    start = tuple(t + 1e-4 for t in result.x)
    warm = minres(matvec, v, 100, tol=1e-13, x0=start)
    assert warm.converged and warm.products == warm.iters + 2 and warm.iters < result.iters
    assert rel_error(torch.cat(warm.x), torch.linalg.solve(matrix, b)) < 1e-8


def test_converged_describes_the_returned_iterate():
    matrix, matvec, v = symmetric_system(INDEFINITE)
    b = torch.cat(v)
    short = minres(matvec, v, 3, tol=1e-13)
    assert short.converged is False and short.iters == 3 and short.products == 4
    assert short.residual == pytest.approx(float((b - matrix @ torch.cat(short.x)).norm() / b.norm()))
    assert short.residual < 1.0  # the minimum residual over the Krylov space never exceeds ‖v‖


def test_on_a_singular_system_minres_returns_the_minimum_norm_least_squares_solution():
    matrix, matvec, v = symmetric_system(SINGULAR)
    b = torch.cat(v)
    pinv = torch.linalg.pinv(matrix, hermitian=True)
    eigenvalues, basis = torch.linalg.eigh(matrix)
    in_range = basis[:, eigenvalues.abs() > 1e-8]
    compatible = in_range @ (in_range.T @ b)  # v in the range: a solution exists
    result = minres(matvec, (compatible[:-2], compatible[-2:]), 100, tol=1e-13)
    assert result.converged and not result.singular
    assert rel_error(torch.cat(result.x), pinv @ compatible) < 1e-8
    # v with a null-space part: no solution; the least-squares one of smallest norm, flagged
    result = minres(matvec, v, 100, tol=1e-13)
    assert result.singular and result.breakdown == "singular" and not result.converged
    assert "damping" in result.message
    assert rel_error(torch.cat(result.x), pinv @ b) < 1e-8
    least_squares = float((b - matrix @ (pinv @ b)).norm() / b.norm())
    assert result.residual == pytest.approx(least_squares, rel=1e-8) and least_squares > 0.1


def test_a_non_finite_product_stops_minres_and_names_it():
    _, matvec, v = symmetric_system(INDEFINITE)
    calls = {"n": 0}

    def broken(x):
        calls["n"] += 1
        out = matvec(x)
        return (out[0] * float("nan"), out[1]) if calls["n"] == 3 else out

    with pytest.raises(NonFiniteError, match="product 3 of the MINRES"):
        minres(broken, v, 20)
    with pytest.raises(ValueError, match="iters"):
        minres(matvec, v, 0)
    zero = minres(matvec, tuple(torch.zeros_like(t) for t in v), 5)
    assert zero.converged and zero.products == 0


def tanh_mlp(steps: int = 200):
    """A 3-6-1 tanh network (31 params) with a log weight decay, after ``steps`` Adam steps:
    near, not at, a minimum, where its Hessian has a negative eigenvalue."""
    g = torch.Generator().manual_seed(0)
    x, xv = (torch.randn(32, 3, generator=g, dtype=f64) for _ in range(2))
    y, yv = torch.sin(x.sum(1, keepdim=True)), torch.sin(xv.sum(1, keepdim=True))
    shapes = [(3, 6), (6,), (6, 1), (1,)]
    params = [(0.5 * torch.randn(s, generator=g, dtype=f64)).requires_grad_() for s in shapes]
    decay = torch.tensor(-4.0, dtype=f64, requires_grad=True)

    def net(p, inputs):
        return torch.tanh(inputs @ p[0] + p[1]) @ p[2] + p[3]

    def inner(p, d):
        return ((net(p, x) - y) ** 2).mean() + 0.5 * d.exp() * sum((t**2).sum() for t in p)

    def outer(p, d):
        return ((net(p, xv) - yv) ** 2).mean()

    optimizer = torch.optim.Adam(params, lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        inner(params, decay.detach()).backward()
        optimizer.step()
    return inner, outer, params, decay


def test_implicit_minres_matches_the_dense_ift_on_a_network_with_negative_curvature():
    inner, outer, params, decay = tanh_mlp()
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss(z):
        return inner([c.reshape(s) for c, s in zip(z.split(sizes), shapes)], decay.detach())

    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))
    assert eigenvalues[0] < -1e-3 and eigenvalues[-1] > 1.0  # indefinite, not near-singular
    exact = HyperGradient("implicit-exact").compute(inner, outer, params, decay)
    hg = HyperGradient("implicit-minres", iters=200, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged MINRES solve does not warn
        got = hg.compute(inner, outer, params, decay)
    assert rel_error(got, exact) < 1e-8
    assert hg.stats.converged and hg.stats.residual <= 1e-12 and hg.stats.hvps < 100
    cg = HyperGradient("implicit-cg", iters=200, tol=1e-12)
    with pytest.warns(bilevel.HypergradientWarning, match="implicit-minres"):
        wrong = cg.compute(inner, outer, params, decay)
    assert cg.stats.negative_curvature and rel_error(wrong, exact) > 1e-3


def test_implicit_minres_options_state_and_saddle():
    with pytest.raises(ValueError, match="option iters"):
        HyperGradient("implicit-minres", iters=0)
    with pytest.raises(TypeError, match="option warm_start"):
        HyperGradient("implicit-minres", warm_start="yes")
    with pytest.raises(ValueError, match="option damping"):
        HyperGradient("implicit-minres", damping=-1.0)
    inner, outer, theta, phi = saddle()  # H = diag(1, −1): CG breaks down, MINRES solves it
    hg = HyperGradient("implicit-minres", warm_start=True, tol=1e-12)
    first = hg.compute(inner, outer, theta, phi)
    exact = HyperGradient("implicit-exact").compute(inner, outer, theta, phi)
    assert rel_error(first, exact) < 1e-12 and hg.stats.converged
    assert set(hg.state_dict()["state"]) == {"previous"}
    again = hg.compute(inner, outer, theta, phi)  # warm: the start already solves the system
    assert rel_error(again, exact) < 1e-12 and hg.stats.hvps == 1 and hg.stats.converged


def test_stats_say_how_much_of_x_lies_along_negative_curvature():
    """On an exactly solved diagonal system the share is the negative eigenvalues' part of
    ‖x‖²; on a definite one it is zero."""
    eigenvalues = torch.tensor([3.0, 2.0, 1.0, -0.5, -0.1], dtype=torch.float64)
    v = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    x = v / eigenvalues
    expected = float((x[eigenvalues < 0] ** 2).sum() / (x**2).sum())
    result = minres(lambda t: (eigenvalues * t[0],), (v,), iters=10, tol=1e-12)
    assert float(result.info["negative_share"]) == pytest.approx(expected, rel=1e-8)
    assert int(result.info["negative_ritz"]) == 2
    definite = minres(lambda t: (eigenvalues.abs() * t[0],), (v,), iters=10, tol=1e-12)
    assert float(definite.info["negative_share"]) == 0.0 and int(definite.info["negative_ritz"]) == 0
    hg = HyperGradient("implicit-minres")
    hg.compute(*saddle())  # H = diag(1, −1), ∂g/∂θ = (2, −4): x = (2, 4), 16 of ‖x‖² = 20 negative
    assert hg.stats.extra["negative_curvature_share"] == pytest.approx(0.8, rel=1e-10)
    assert hg.stats.extra["negative_ritz_values"] == 1


def test_minres_on_a_rank_deficient_least_squares_hessian_returns_the_pseudoinverse_solution():
    """More features than samples (n = 20 < P = 60): the Hessian has 40 zero eigenvalues and
    most of v lies in its null space. Once the Krylov space is (numerically) invariant the
    next pivots are rounding; the solve stops at the least-squares solution instead of
    dividing by them (which used to give ‖x‖ ≈ 1e15), at every budget and tolerance."""
    g = torch.Generator().manual_seed(0)
    n, p = 20, 60
    features = torch.randn(n, p, generator=g, dtype=f64)
    hessian = 0.25 * features.T @ features / n
    v = torch.randn(40, p, generator=g, dtype=f64).T @ torch.randn(40, generator=g, dtype=f64) / 40
    pinv = torch.linalg.pinv(hessian, hermitian=True, rtol=1e-10)
    assert int((torch.linalg.eigvalsh(hessian).abs() < 1e-10).sum()) == 40
    least_squares = float((v - hessian @ (pinv @ v)).norm() / v.norm())
    assert least_squares > 0.5  # the null-space part of v
    for tol, iters in [(1e-8, 25), (1e-8, 2000), (1e-12, 30), (1e-12, 500)]:
        result = minres(lambda x: (hessian @ x[0],), (v,), iters, tol=tol)
        x = result.x[0]
        assert result.breakdown == "singular" and not result.converged and result.iters <= 25
        assert float((x - pinv @ v).norm()) < 1e-6
        assert result.residual == pytest.approx(float((v - hessian @ x).norm() / v.norm()), rel=1e-12)
        assert result.residual == pytest.approx(least_squares, rel=1e-8)


def test_minres_never_returns_an_iterate_worse_than_its_start():
    """In float32 a condition number of 1e8 is numerically singular: rounding breaks the
    recurrence, and an iterate with a residual above ‖v‖ falls back to the start, flagged."""
    g = torch.Generator().manual_seed(1)
    n = 200
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    matrix = ((basis * torch.logspace(0, -8, n, dtype=f64)) @ basis.T).float()
    v = torch.randn(n, generator=g, dtype=f64).float()
    result = minres(lambda x: (matrix @ x[0],), (v,), 600, tol=1e-6)
    assert not result.converged and result.residual <= 1.0
    if result.iterate == 0:
        assert result.breakdown == "singular" and result.residual == 1.0
        assert float(result.x[0].abs().max()) == 0.0
