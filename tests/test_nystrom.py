"""The Nyström sketches and solve (bilevel/_src/solvers/nystrom.py) and implicit-nystrom's
honest verdict: full rank is exact, the error falls with rank on a low-rank spectrum, and a
default that is inaccurate says so."""

import warnings

import pytest
import torch

from bilevel import HyperGradient, HypergradientWarning
from bilevel._src.solvers.nystrom import column_sketch, gaussian_sketch, sketch_solve
from bilevel._src.tree_math import flat

from problems import rel_error, symmetric_system

LOW_RANK = [100.0 / (i + 1) for i in range(12)] + [1e-2] * 48  # 12 large eigenvalues, a flat tail


def _sketch(kind, matrix, rank, seed=0):
    size = matrix.shape[0]
    if kind == "gaussian":
        return gaussian_sketch(
            lambda rows: rows @ matrix.T,
            size,
            rank,
            matrix.dtype,
            matrix.device,
            torch.Generator().manual_seed(seed),
        )
    indices = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:rank]
    return column_sketch(matrix[indices], indices)


@pytest.mark.parametrize("kind", ["gaussian", "columns"])
def test_full_rank_is_the_matrix_and_the_solve_is_exact(kind):
    matrix, _, v = symmetric_system([float(k) for k in range(1, 21)])
    sketch = _sketch(kind, matrix, 20)
    approximation = sketch.basis @ torch.diag(sketch.eigenvalues) @ sketch.basis.T
    torch.testing.assert_close(approximation, matrix, rtol=0, atol=1e-12)
    x = flat(sketch_solve(sketch, v, rho=0.5).x)  # ρ below λmin = 1 stands in for nothing
    torch.testing.assert_close(matrix @ x, flat(v), rtol=0, atol=1e-12)
    assert not sketch.singular


@pytest.mark.parametrize("kind", ["gaussian", "columns"])
def test_the_approximation_never_exceeds_the_matrix(kind):
    matrix, _, _ = symmetric_system(LOW_RANK, seed=1)
    sketch = _sketch(kind, matrix, 8)
    gap = matrix - sketch.basis @ torch.diag(sketch.eigenvalues) @ sketch.basis.T
    assert float(torch.linalg.eigvalsh(gap).min()) > -1e-10
    assert (sketch.eigenvalues[:-1] >= sketch.eigenvalues[1:]).all()


def test_error_falls_with_rank_on_a_low_rank_spectrum():
    """ρ applies only outside the sketch: once the sketch holds the 12 large eigenvalues, the
    tail's ρ = its level makes the solve nearly exact (a ρ added everywhere, as in
    (CM⁺Cᵀ + ρI)⁻¹, would bias the large directions instead)."""
    matrix, _, v = symmetric_system(LOW_RANK, seed=2)
    exact = torch.linalg.solve(matrix, flat(v))
    errors = [
        rel_error(flat(sketch_solve(_sketch("gaussian", matrix, k), v, 1e-2).x), exact)
        for k in (4, 8, 16, 32)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 and errors[0] > 0.1


def test_a_singular_matrix_is_flagged():
    matrix = torch.ones(2, 2, dtype=torch.float64)
    assert _sketch("gaussian", matrix, 2).singular and _sketch("columns", matrix, 2).singular


def test_defaults_are_accurate_or_flagged():
    """At rank 10 on a 60-parameter problem with 12 large eigenvalues the default is far off:
    the residual it spends one product on says so, with a warning."""
    matrix, matvec, v = symmetric_system(LOW_RANK, seed=3)
    star = torch.linalg.solve(matrix, torch.cat(v))  # the inner minimiser at h = 1
    w = star[:58].clone().requires_grad_(), star[58:].clone().requires_grad_()
    lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)

    def inner(params, h):
        x = torch.cat(params)
        return 0.5 * x @ matrix @ x - h * (x @ torch.cat(v))

    outer = lambda params, h: 0.5 * (torch.cat(params) ** 2).sum()
    hg = HyperGradient("implicit-nystrom")
    with pytest.warns(HypergradientWarning, match="stopped above its tolerance"):
        hg.compute(inner, outer, w, lam)
    assert hg.stats.converged is False and hg.stats.residual > 1e-3 and hg.stats.hvps == 10 + 1
    full = HyperGradient("implicit-nystrom", rank=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        full.compute(inner, outer, w, lam)
    assert full.stats.converged and full.stats.residual < 1e-10


def test_options_are_validated():
    with pytest.raises(ValueError, match="option sketch must be one of 'columns', 'gaussian'"):
        HyperGradient("implicit-nystrom", sketch="sparse")
    with pytest.raises(TypeError, match="option rho must be a number"):
        HyperGradient("implicit-nystrom", rho="tiny")
