"""MAML: the same tensors (or module) as params and hparams in the unrolled modes.

The references differentiate by hand through explicit optimizer steps that start at the
init φ itself (θ_0 = φ, create_graph=True), with torch.optim's update rules written out.
"""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bilevel import HyperGradient

from problems import load_script, maml_reference, mse, rel_error, sgd_rule

STEPS = 5


class Scaled(nn.Module):
    """A small MLP with a buffer its forward pass reads (an input shift)."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, width)
        self.out = nn.Linear(width, 1)
        self.register_buffer("shift", torch.tensor([0.5, -0.25, 0.1]))

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x - self.shift)))


def _model(seed: int = 0, width: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return Scaled(width).double()


def _task(seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 1, generator=g, dtype=torch.float64)
    xs, xq = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (10, 12))
    return xs, torch.sin(xs @ a), xq, torch.sin(xq @ a)


def _closures(task):
    xs, ys, xq, yq = task
    return (lambda m, init: mse(m(xs), ys)), (lambda m, init: mse(m(xq), yq))


def _adam(theta, grads, state, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, higher=False):
    """torch.optim.Adam's rule (eps added after the bias correction of √v), or higher's
    (``higher``: eps added to √v before it)."""
    (b1, b2), n = betas, t + 1
    grads = [g + weight_decay * p for g, p in zip(grads, theta)]
    m, v = state if state else ([0 * p for p in theta], [0 * p for p in theta])
    m = [b1 * a + (1 - b1) * g for a, g in zip(m, grads)]
    v = [b2 * a + (1 - b2) * g * g for a, g in zip(v, grads)]
    if higher:
        step = [lr * (1 - b2**n) ** 0.5 / (1 - b1**n) * a / (b.sqrt() + eps) for a, b in zip(m, v)]
    else:
        step = [lr / (1 - b1**n) * a / ((b / (1 - b2**n)).sqrt() + eps) for a, b in zip(m, v)]
    return [p - s for p, s in zip(theta, step)], (m, v)


CASES = [
    (torch.optim.SGD, sgd_rule, {"lr": 0.1}),
    (torch.optim.SGD, sgd_rule, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}),
    (torch.optim.Adam, _adam, {"lr": 0.05, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
@pytest.mark.parametrize("optimizer, rule, options", CASES)
def test_maml_with_the_module_as_params_and_hparams_equals_the_hand_written_loop(
    backend, optimizer, rule, options
):
    model, task = _model(), _task(1)
    placement = {"higher": backend == "higher"} if rule is _adam else {}  # where higher adds eps
    expected = maml_reference(model, task, rule, **options, **placement)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hg = HyperGradient("unroll", steps=STEPS, inner_optimizer=optimizer, backend=backend, **options)
    got = hg.compute(*_closures(task), model, model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert rel_error(got[name], expected[name]) < 1e-10, name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing moved


def test_maml_on_plain_tensors_and_the_hparams_argument_is_the_init():
    w0 = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = x @ torch.tensor([1.0, 2.0], dtype=torch.float64)
    seen = []

    def inner(w, init):
        seen.append(init.detach().clone())
        return ((x @ w - y) ** 2).mean() + ((w - init) ** 2).sum()  # init enters the loss too

    def outer(w, init):
        return ((x @ w - 1.0) ** 2).mean()

    phi = w0.detach().clone().requires_grad_()
    theta = phi
    for _ in range(STEPS):
        grad = torch.autograd.grad(inner(theta, phi), theta, create_graph=True)[0]
        theta = theta - 0.1 * grad
    expected = torch.autograd.grad(outer(theta, phi), phi)[0]
    seen.clear()
    got = HyperGradient("unroll", steps=STEPS, lr=0.1).compute(inner, outer, w0, w0)
    assert rel_error(got, expected) < 1e-10
    assert all(torch.equal(s, w0.detach()) for s in seen)  # hparams is the init at every step


def test_maml_with_a_learned_learning_rate_beside_the_init():
    model, task = _model(), _task(2)
    log_lr = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    inner, outer = _closures(task)
    hg = HyperGradient("unroll", steps=STEPS, lr=lambda h: h["log_lr"].exp())
    hparams = {"init": model, "log_lr": log_lr}  # the closures' hparams: {"init": dict, "log_lr": tensor}
    got = hg.compute(lambda m, h: inner(m, h["init"]), lambda m, h: outer(m, h["init"]), model, hparams)
    expected = maml_reference(model, task, sgd_rule, lr=float(log_lr.exp()))
    for name in expected:
        assert rel_error(got["init"][name], expected[name]) < 1e-10, name
    step = 1e-6  # the learning rate's part by central differences of the hand-written loop
    values = []
    for sign in (1, -1):
        xs, ys, xq, yq = task
        names = [n for n, _ in model.named_parameters()]
        theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
        lr = float((log_lr + sign * step).exp())
        for _ in range(STEPS):
            loss = mse(functional_call(model, dict(zip(names, theta)), (xs,)), ys)
            theta = [p - lr * g for p, g in zip(theta, torch.autograd.grad(loss, theta))]
            theta = [p.detach().requires_grad_() for p in theta]
        values.append(float(mse(functional_call(model, dict(zip(names, theta)), (xq,)), yq)))
    assert abs(float(got["log_lr"]) - (values[0] - values[1]) / (2 * step)) < 1e-7


def test_a_meta_batch_is_the_mean_over_tasks_of_backward():
    model, tasks = _model(), [_task(s) for s in (4, 5, 6)]
    expected = [maml_reference(model, t, sgd_rule, lr=0.1) for t in tasks]
    hg = HyperGradient("unroll", steps=STEPS, lr=0.1)
    for task in tasks:  # .grad accumulates over the tasks; divide for the mean
        hg.backward(*_closures(task), model, model)
    for name, p in model.named_parameters():
        mean = sum(e[name] for e in expected) / len(tasks)
        assert rel_error(p.grad / len(tasks), mean) < 1e-10, name


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
@pytest.mark.parametrize("options", [{"checkpoint": 2}, {"direction": "forward"}, {"truncate": STEPS}])
def test_checkpointed_forward_and_full_truncation_agree_with_the_plain_unroll(options, backend):
    model, task = _model(width=2), _task(7)  # 11 entries: few enough tangents for forward mode
    mode = "truncated-unroll" if "truncate" in options else "unroll"
    common = {"steps": STEPS, "lr": 0.1, "momentum": 0.5, "weight_decay": 0.05, "backend": backend}
    plain = HyperGradient("unroll", **common).compute(*_closures(task), model, model)
    got = HyperGradient(mode, **common, **options).compute(*_closures(task), model, model)
    for name in plain:
        assert rel_error(got[name], plain[name]) < 1e-10, name


@pytest.mark.slow
def test_the_compiled_sgd_program_starts_at_the_init():
    model, task = _model(), _task(8)
    expected = maml_reference(model, task, sgd_rule, lr=0.1, momentum=0.9)
    hg = HyperGradient("unroll", steps=STEPS, lr=0.1, momentum=0.9, compile=True)
    for _ in range(2):  # the first call runs eagerly, the second the program
        got = hg.compute(*_closures(task), model, model)
        for name in expected:
            assert rel_error(got[name], expected[name]) < 1e-10, name
    assert hg.stats.extra.get("compiled") is True


@pytest.mark.parametrize("mode", ["implicit-cg", "implicit-neumann", "implicit-exact", "penalty"])
def test_the_implicit_and_penalty_modes_refuse_with_the_imaml_recipe(mode):
    model, task = _model(), _task(9)
    with pytest.raises(ValueError, match=r"(?s)only the unrolled modes.*iMAML.*lam / 2"):
        HyperGradient(mode).compute(*_closures(task), model, model)


def test_what_a_tie_cannot_mean_is_refused():
    model, task = _model(), _task(10)
    closures = _closures(task)
    with pytest.raises(ValueError, match="hypergradient of the init would be zero"):
        HyperGradient("truncated-unroll", steps=STEPS, truncate=2).compute(*closures, model, model)
    with pytest.raises(ValueError, match="update_params=True with tensors shared"):
        HyperGradient("unroll", steps=STEPS, update_params=True).compute(*closures, model, model)
    with pytest.raises(ValueError, match="shares 2 of its 4 parameters"):
        HyperGradient("unroll", steps=STEPS).compute(*closures, model.hidden, model)
    other = nn.Linear(1, 1).double()
    with pytest.raises(ValueError, match="and a module that is not"):
        HyperGradient("unroll", steps=STEPS).compute(*closures, model, {"init": model, "head": other})


def test_readme_maml_recipe():
    # --- README recipe: MAML (begin)
    import torch
    import torch.nn.functional as F

    from bilevel import HyperGradient

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    hg = HyperGradient("unroll", steps=5, lr=0.1)  # inner SGD; the init is the hyperparameter

    def sine_task(n=10):
        amplitude, phase = 4 * torch.rand(1) + 0.1, 3 * torch.rand(1)
        x = 10 * torch.rand(2 * n, 1) - 5
        y = amplitude * torch.sin(x + phase)
        return x[:n], y[:n], x[n:], y[n:]  # support, query

    def task_losses(xs, ys, xq, yq):  # inner: the support loss at θ; outer: the query loss at θ_5
        return (lambda m, init: F.mse_loss(m(xs), ys)), (lambda m, init: F.mse_loss(m(xq), yq))

    for _ in range(3):  # meta-iterations
        meta_opt.zero_grad()
        tasks = [sine_task() for _ in range(4)]
        for task in tasks:  # params and hparams: the same model, so θ_0 = the init
            hg.backward(*task_losses(*task), model, model)  # accumulates into each p.grad
        for p in model.parameters():
            p.grad /= len(tasks)  # the meta-batch mean
        meta_opt.step()
    # --- README recipe: MAML (end)
    task = sine_task()  # one more task's meta-gradient, against the hand-written loop
    got = hg.compute(*task_losses(*task), model, model)
    expected = maml_reference(model, task, sgd_rule, lr=0.1)
    assert all(rel_error(got[k], expected[k]) < 1e-5 for k in expected)  # float32


@pytest.mark.slow
def test_the_maml_benchmark_quick_run_agrees_with_the_hand_written_loop(capsys):
    result = load_script(Path(__file__).parent.parent / "benchmarks" / "maml.py").main(["--quick"])
    assert result.diff < 1e-5  # float32: the same steps in another order of operations
    assert result.ratio > 0 and "ours/hand" in capsys.readouterr().out


def test_the_imaml_recipe_of_the_refusal_gives_the_closed_form():
    """iMAML on least squares: θ* = (A + λI)⁻¹(b + λφ), so dg/dφ = λ(A + λI)⁻¹ ∇g(θ*)."""
    torch.manual_seed(11)
    model = nn.Linear(4, 1, bias=False).double()
    x, y, xq, yq = (
        torch.randn(20, 4).double(),
        torch.randn(20, 1).double(),
        torch.randn(9, 4).double(),
        torch.randn(9, 1).double(),
    )
    lam = 0.7

    def task_loss(p):
        return mse(functional_call(model, p, (x,)), y)

    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    inner = lambda p, init: task_loss(p) + lam / 2 * sum(((p[k] - init[k]) ** 2).sum() for k in p)
    a = 2 * x.T @ x / len(x) + lam * torch.eye(4, dtype=torch.float64)
    phi = model.weight.detach().reshape(4, 1)
    star = torch.linalg.solve(a, 2 * x.T @ y / len(x) + lam * phi)
    with torch.no_grad():
        theta["weight"].copy_(star.reshape(1, 4))  # trained to the minimiser of inner
    outer = lambda p, init: mse(functional_call(model, p, (xq,)), yq)
    got = HyperGradient("implicit-exact").compute(inner, outer, theta, dict(model.named_parameters()))
    expected = lam * torch.linalg.solve(a, 2 * xq.T @ (xq @ star - yq) / len(xq))
    assert rel_error(got["weight"], expected.reshape(1, 4)) < 1e-10


def test_a_tied_module_reaches_the_closures_as_a_dict_of_the_init():
    model, task = _model(), _task(12)
    seen = []
    inner, outer = _closures(task)
    HyperGradient("unroll", steps=2).compute(lambda m, h: seen.append(h) or inner(m, h), outer, model, model)
    assert isinstance(seen[0], dict) and seen[0].keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(seen[0][k], v) for k, v in model.named_parameters())


def test_a_partial_tie_starts_only_the_tied_tensor_at_the_init():
    g = torch.Generator().manual_seed(13)
    x, y = (
        torch.randn(10, 3, generator=g, dtype=torch.float64),
        torch.randn(10, generator=g, dtype=torch.float64),
    )
    w, v = (torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def inner(p, h):  # params (w, v); hparams (the init of w, a scale of v's decay)
        return ((x @ (p[0] * p[1]) - y) ** 2).mean() + h[1] * (p[1] ** 2).sum()

    def outer(p, h):
        return ((x @ (p[0] + p[1]) - 1.0) ** 2).mean()

    phi, s = w.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
    theta = [phi, v.detach().requires_grad_()]  # v starts at its own value
    for _ in range(STEPS):
        grads = torch.autograd.grad(inner(theta, (phi, s)), theta, create_graph=True)
        theta = [t - 0.1 * d for t, d in zip(theta, grads)]
    expected = torch.autograd.grad(outer(theta, (phi, s)), (phi, s))
    got = HyperGradient("unroll", steps=STEPS, lr=0.1).compute(inner, outer, (w, v), (w, scale))
    assert all(rel_error(a, b) < 1e-10 for a, b in zip(got, expected))
