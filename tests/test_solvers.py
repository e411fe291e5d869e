"""The conjugate-gradient solver on explicit matrices."""

import pytest
import torch

from bilevel.errors import NonFiniteError
from bilevel.solvers import conjugate_gradient

from problems import symmetric_system

f64 = torch.float64


SPD = [10.0 ** (-k / 3) for k in range(12)]  # κ = 2e3
INDEFINITE = [3.0, 2.0, 1.0, 0.5, -0.2, 0.1, 1.5, 2.5]


def test_cg_solves_spd_systems_from_zero_and_from_a_start():
    matrix, matvec, v = symmetric_system(SPD)
    exact = torch.linalg.solve(matrix, torch.cat(v))
    result = conjugate_gradient(matvec, v, 200, tol=1e-12)
    assert result.converged and torch.allclose(torch.cat(result.x), exact, rtol=1e-8, atol=1e-10)
    assert result.products == result.iters + 1 < 201  # and the true residual's product
    start = tuple(t + 1e-3 for t in result.x)
    warm = conjugate_gradient(matvec, v, 200, tol=1e-12, x0=start)
    assert warm.converged and warm.products == warm.iters + 2 and warm.iters < result.iters  # start, true
    damped = conjugate_gradient(matvec, v, 200, tol=1e-12, damping=0.5)
    shifted = torch.linalg.solve(matrix + 0.5 * torch.eye(len(SPD), dtype=f64), torch.cat(v))
    assert torch.allclose(torch.cat(damped.x), shifted, rtol=1e-9, atol=1e-12)


def test_cg_stops_at_negative_curvature_and_says_so():
    _, matvec, v = symmetric_system(INDEFINITE)
    result = conjugate_gradient(matvec, v, 20)
    assert result.negative_curvature and not result.converged and result.iters == result.products < 20


@pytest.mark.parametrize("overlap", [False, True])
def test_a_non_finite_product_stops_the_solve_and_names_it(overlap):
    _, matvec, v = symmetric_system(SPD)
    calls = {"n": 0}

    def broken(x):
        calls["n"] += 1
        out = matvec(x)
        return (out[0] * float("nan"), out[1]) if calls["n"] == 3 else out

    with pytest.raises(NonFiniteError, match="product 3"):
        conjugate_gradient(broken, v, 20, tol=1e-12, overlap=overlap)


@pytest.mark.parametrize(
    "eigenvalues, tol, iters", [(SPD, 1e-12, 200), (SPD, 0.0, 7), (INDEFINITE, 1e-12, 20)]
)
def test_overlapped_cg_reads_one_iteration_late_and_returns_the_same_iterate(eigenvalues, tol, iters):
    """overlap=True (the default on CUDA) queues iteration k+1 before reading iteration k: the
    same iterate, and one extra (discarded) product exactly when the solve stops early."""
    _, matvec, v = symmetric_system(eigenvalues)
    plain = conjugate_gradient(matvec, v, iters, tol=tol, overlap=False)
    ahead = conjugate_gradient(matvec, v, iters, tol=tol, overlap=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.x, ahead.x))
    assert (ahead.iters, ahead.residual, ahead.converged, ahead.negative_curvature) == (
        plain.iters,
        plain.residual,
        plain.converged,
        plain.negative_curvature,
    )
    stopped_early = plain.iters < iters
    assert ahead.products == plain.products + int(stopped_early)
