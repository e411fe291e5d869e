"""nn.Module style: closures call the modules directly; the modules are left exactly as found."""

import copy

import pytest
import torch
from torch import nn

from bilevel import HyperGradient

from problems import ridge


class PerWeightDecay(nn.Module):
    """Log weight decay per weight of a target module (an hparams module)."""

    def __init__(self, target: nn.Module):
        super().__init__()
        self.logs = nn.ParameterDict(
            {
                n.replace(".", "_"): nn.Parameter(torch.full_like(p, -2.0))
                for n, p in target.named_parameters()
            }
        )

    def penalty(self, target: nn.Module) -> torch.Tensor:
        return sum(
            0.5 * (self.logs[n.replace(".", "_")].exp() * p**2).sum() for n, p in target.named_parameters()
        )


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    xv = torch.randn(32, 3, generator=g, dtype=torch.float64)
    return x, y, xv, torch.sin(xv.sum(1, keepdim=True))


def _fit(model, decay, x, y, steps=60):
    """Full-batch L-BFGS to a tight stationary point of the inner loss."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=steps,
        tolerance_grad=1e-13,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean() + decay.penalty(model)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    model.zero_grad(set_to_none=True)
    decay.zero_grad(set_to_none=True)


def test_module_params_and_hparams_match_the_functional_form():
    torch.manual_seed(0)
    x, y, xv, yv = _data()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    decay = PerWeightDecay(model).double()
    _fit(model, decay, x, y)
    snapshot = copy.deepcopy(model.state_dict()), copy.deepcopy(decay.state_dict())

    # module style: the closures ignore their arguments and call the modules
    inner = lambda m, d: ((model(x) - y) ** 2).mean() + decay.penalty(model)
    outer = lambda m, d: ((model(xv) - yv) ** 2).mean()
    hg = HyperGradient("implicit-exact")
    grads = hg.compute(inner, outer, model, decay)
    assert isinstance(grads, dict) and set(grads) == {n for n, _ in decay.named_parameters()}

    # functional form on plain tensors: the same numbers
    names = [n for n, _ in model.named_parameters()]
    from torch.func import functional_call

    def f_inner(ps, logs):
        m = dict(zip(names, ps))
        out = functional_call(model, m, (x,))
        pen = sum(0.5 * (l.exp() * p**2).sum() for l, p in zip(logs, ps))
        return ((out - y) ** 2).mean() + pen

    def f_outer(ps, logs):
        return ((functional_call(model, dict(zip(names, ps)), (xv,)) - yv) ** 2).mean()

    ps = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    keys = ["logs." + n.replace(".", "_") for n in names]
    logs = tuple(decay.get_parameter(k).detach().clone().requires_grad_() for k in keys)
    flat = HyperGradient("implicit-exact").compute(f_inner, f_outer, ps, logs)
    for key, b in zip(keys, flat):
        assert torch.allclose(grads[key], b, rtol=1e-10, atol=1e-14)

    # the modules are exactly as found, with no .grad written
    for now, before in ((model.state_dict(), snapshot[0]), (decay.state_dict(), snapshot[1])):
        assert all(torch.equal(now[k], before[k]) for k in before)
    assert all(p.grad is None for p in list(model.parameters()) + list(decay.parameters()))


def test_backward_on_module_hparams_fills_their_grad():
    x, y, xv, yv = _data(1)
    model = nn.Linear(3, 1).double()
    decay = PerWeightDecay(model).double()
    _fit(model, decay, x, y)
    inner = lambda m, d: ((m(x) - y) ** 2).mean() + d.penalty(m)
    outer = lambda m, d: ((m(xv) - yv) ** 2).mean()
    hg = HyperGradient("implicit-cg", tol=1e-12)
    expected = hg.compute(inner, outer, model, decay)
    hg.backward(inner, outer, model, decay)
    for name, p in decay.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-12)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")  # not at a minimum
def test_batchnorm_buffers_are_not_touched():
    torch.manual_seed(0)
    x, y, xv, yv = _data(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    model.train()
    lam = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    inner = lambda m, l: ((m(x) - y) ** 2).mean() + l.exp() * sum((p**2).sum() for p in m.parameters())
    outer = lambda m, l: ((m(xv) - yv) ** 2).mean()
    before = copy.deepcopy(model.state_dict())
    HyperGradient("implicit-cg", iters=5).compute(inner, outer, model, lam)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # running stats included
    assert model.training


def test_frozen_parameters_are_constants():
    x, y, xv, yv = _data(3)
    model = nn.Linear(3, 1).double()
    model.bias.requires_grad_(False)
    lam = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    inner = lambda m, l: ((m(x) - y) ** 2).mean() + l.exp() * (m.weight**2).sum()
    outer = lambda m, l: ((m(xv) - yv) ** 2).mean()
    with torch.no_grad():  # put the weight at the inner optimum for the frozen bias
        a = x.T @ x / 64 + torch.eye(3, dtype=torch.float64) * lam.exp()
        model.weight.copy_(torch.linalg.solve(a, x.T @ (y - model.bias) / 64).T)
    grad = HyperGradient("implicit-exact").compute(inner, outer, model, lam)

    def response(l):
        a = x.T @ x / 64 + torch.eye(3, dtype=torch.float64) * l.exp()
        w = torch.linalg.solve(a, x.T @ (y - model.bias.detach()) / 64).T
        return ((xv @ w.T + model.bias.detach() - yv) ** 2).mean()

    expected = torch.autograd.grad(response(lam), lam)[0]
    assert torch.allclose(grad, expected, rtol=1e-9)


def test_tensor_params_with_module_hparams_mixed_in_a_tuple():
    problem = ridge(p=3)
    scale = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        scale.weight.fill_(1.0)
    inner = lambda w, h: problem.inner_loss(w, h[0] * h[1].weight.squeeze())
    grads = HyperGradient("implicit-exact").compute(
        inner, problem.outer_loss, problem.params_star(), (problem.hparams, scale)
    )
    assert isinstance(grads, tuple) and set(grads[1]) == {"weight"}
    assert torch.allclose(grads[0], problem.exact_hypergradient(), rtol=1e-10)
    # d/ds of g(w*(s·λ)) at s = 1 is ⟨∇λ g, λ⟩
    expected = (problem.exact_hypergradient() * problem.hparams.detach()).sum()
    assert torch.allclose(grads[1]["weight"].squeeze(), expected, rtol=1e-10)
