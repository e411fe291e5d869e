"""State safety and long runs, for every registered mode."""
import copy
import gc
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import bilevel
from bilevel import HyperGradient

ALL_MODES = bilevel.available_modes()


def _module_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=g, dtype=torch.float64)
    y = torch.randn(32, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    model[0].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    decay = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)

    def inner(m, d):
        return ((m(x) - y) ** 2).mean() + d.exp() * sum((p ** 2).sum() for p in m.parameters())

    def outer(m, d):
        return ((m(x[:16]) - y[:16]) ** 2).mean()

    return model, decay, inner, outer


def _snapshot(model, decay):
    return (copy.deepcopy(model.state_dict()),
            {n: (None if p.grad is None else p.grad.clone(), p.requires_grad)
             for n, p in model.named_parameters()},
            (decay.detach().clone(), None if decay.grad is None else decay.grad.clone()),
            model.training)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")
@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_call_leaves_parameters_buffers_and_grads_as_they_were(mode):
    model, decay, inner, outer = _module_problem()
    for p in model.parameters():  # pre-existing .grad must survive untouched
        p.grad = torch.full_like(p, 0.5)
    before = _snapshot(model, decay)
    grad = HyperGradient(mode).compute(inner, outer, model, decay)
    assert grad.shape == decay.shape and grad.dtype == decay.dtype and torch.isfinite(grad).all()
    assert _same(_snapshot(model, decay), before)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_call_that_raises_midway_leaves_everything_as_it_was(mode):
    model, decay, inner, outer = _module_problem(1)
    before = _snapshot(model, decay)
    calls = {"n": 0}

    def failing_outer(m, d):
        calls["n"] += 1
        raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        HyperGradient(mode).backward(inner, failing_outer, model, decay)
    assert calls["n"] == 1
    assert _same(_snapshot(model, decay), before)


LONG_RUN_STEPS = int(os.environ.get("BILEVEL_LONG_RUN_STEPS", "300"))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_online_loop_has_flat_memory_and_no_nan(mode):
    """An online bilevel loop: a few inner SGD steps, then one hypergradient step. Live tensors
    are counted with gc; a graph or tensor leaking between calls would grow the count.
    Set BILEVEL_LONG_RUN_STEPS=2000 for the long version."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    w = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    lam = torch.full((4,), -1.0, dtype=torch.float64, requires_grad=True)
    inner = lambda w, lam: 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam.exp() * w ** 2).sum()
    outer = lambda w, lam: 0.5 * ((x[:10] @ w - y[:10]) ** 2).mean()
    hg = HyperGradient(mode)
    outer_opt = torch.optim.SGD([lam], lr=0.05)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    counts = []
    for step in range(LONG_RUN_STEPS):
        for _ in range(3):
            (grad_w,) = torch.autograd.grad(inner(w, lam.detach()), w)
            with torch.no_grad():
                w -= 0.3 * grad_w
        outer_opt.zero_grad()
        hg.backward(inner, outer, w, lam)
        outer_opt.step()
        if step in (LONG_RUN_STEPS // 3, LONG_RUN_STEPS - 1):
            counts.append(live_tensors())
    assert torch.isfinite(lam).all() and torch.isfinite(w).all()
    assert counts[1] <= counts[0], counts


def test_readme_training_loop_runs():
    """The README's training-loop example is real code: run it."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## In a training loop\s+```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["hg"].stats.residual < 1e-3
