"""StationarityJacobian: products with the inner Hessian, looped and batched."""

import pytest
import torch

from bilevel._src.products import StationarityJacobian
from bilevel._src.tree_math import flat, unflat

f64 = torch.float64


def _operator():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, generator=g, dtype=f64)
    w = torch.randn(3, 4, generator=g, dtype=f64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=f64, requires_grad=True)
    decay = torch.randn(3, 4, generator=g, dtype=f64, requires_grad=True)

    def f(w, b, decay):
        return torch.tanh(x @ w + b).pow(2).sum() + (decay.exp() * w**2).sum()

    field = torch.autograd.grad(f(w, b, decay), (w, b), create_graph=True)
    dense = torch.autograd.functional.hessian(
        lambda wf, bf: f(wf.reshape(3, 4), bf, decay), (w.detach().flatten(), b.detach())
    )
    hessian = torch.cat([torch.cat(row, dim=1) for row in dense], dim=0)
    return StationarityJacobian.from_field(field, (w, b), (decay,)), hessian


@pytest.mark.parametrize("batched", [False, True])
def test_matmat_gives_the_hessian_columns_looped_and_batched(batched):
    """The batched path (is_grads_batched) is the one CUDA takes; forced here on CPU."""
    operator, hessian = _operator()
    operator.batched = batched
    rows = torch.randn(5, hessian.shape[0], dtype=f64, generator=torch.Generator().manual_seed(1))
    got = operator.matmat(rows)
    assert torch.allclose(got, rows @ hessian, rtol=1e-12, atol=1e-12)
    assert operator.products == 5 and operator.batched == batched
    single = flat(operator.matvec(unflat(rows[0], operator.theta)))
    assert torch.allclose(single, got[0], rtol=1e-12, atol=1e-12)
