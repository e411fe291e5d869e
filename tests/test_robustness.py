"""State safety and long runs, for every registered mode."""

import copy
import gc
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

import bilevel
from bilevel import HyperGradient

from problems import batchnorm_regression, ridge, roundtrip, saddle, shrinkage, singular, split_ridge

ALL_MODES = bilevel.available_modes()


def _snapshot(model, decay):
    return (
        copy.deepcopy(model.state_dict()),
        {
            n: (None if p.grad is None else p.grad.clone(), p.requires_grad)
            for n, p in model.named_parameters()
        },
        (decay.detach().clone(), None if decay.grad is None else decay.grad.clone(), decay.requires_grad),
        model.training,
    )


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
    # a frozen parameter (the first bias) must stay frozen
    model, decay, inner, outer, _, _ = batchnorm_regression(val_rows=16, freeze_first_bias=True)
    for p in model.parameters():  # pre-existing .grad must survive untouched
        p.grad = torch.full_like(p, 0.5)
    before = _snapshot(model, decay)
    grad = HyperGradient(mode).compute(inner, outer, model, decay)
    assert grad.shape == decay.shape and grad.dtype == decay.dtype and torch.isfinite(grad).all()
    assert _same(_snapshot(model, decay), before)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_call_that_raises_midway_leaves_everything_as_it_was(mode):
    model, decay, inner, outer, _, _ = batchnorm_regression(1, val_rows=16, freeze_first_bias=True)
    before = _snapshot(model, decay)
    calls = {"n": 0}

    def failing_outer(m, d):
        calls["n"] += 1
        raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        HyperGradient(mode).backward(inner, failing_outer, model, decay)
    assert calls["n"] == 1
    assert _same(_snapshot(model, decay), before)


LONG_RUN_STEPS = int(os.environ.get("BILEVEL_LONG_RUN_STEPS", "2000"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ALL_MODES)
def test_online_loop_has_flat_memory_and_no_nan(mode):
    """An online bilevel loop: a few inner SGD steps, then one hypergradient step. Live tensors
    are counted with gc; a graph or tensor leaking between calls would grow the count.
    BILEVEL_LONG_RUN_STEPS sets the number of outer steps (default 2,000)."""
    x, _, w, lam, inner, outer = split_ridge(20, 4, val_rows=10)
    # the penalty mode's y needs hundreds of steps from params three SGD steps off the minimum:
    # a short budget keeps the loop quick, and leaks show the same
    hg = HyperGradient(mode, **({"steps": 20} if mode == "penalty" else {}))
    outer_opt = torch.optim.SGD([lam], lr=0.05)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    counts = []
    data_curvature = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max())
    for step in range(LONG_RUN_STEPS):
        step_size = 1.0 / (data_curvature + float(lam.detach().exp().max()))  # stable for any λ
        for _ in range(3):
            (grad_w,) = torch.autograd.grad(inner(w, lam.detach()), w)
            with torch.no_grad():
                w -= step_size * grad_w
        outer_opt.zero_grad()
        hg.backward(inner, outer, w, lam)
        outer_opt.step()
        with torch.no_grad():  # projected step: λ ≤ 2 keeps the unrolled modes' SGD (lr 0.1) stable
            lam.clamp_(-6.0, 2.0)
        if step in (LONG_RUN_STEPS // 3, LONG_RUN_STEPS - 1):
            counts.append(live_tensors())
    assert torch.isfinite(lam).all() and torch.isfinite(w).all()
    assert counts[1] <= counts[0], counts


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")
@pytest.mark.parametrize("mode", ALL_MODES)
def test_online_loop_on_cuda_has_flat_allocated_memory(mode):
    """torch.cuda.memory_allocated counts every tensor, graphs' saved tensors included."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, _, w, lam, inner, outer = split_ridge(64, 16, val_rows=32, device="cuda")
    hg, allocated = HyperGradient(mode), []
    for step in range(60):
        (grad_w,) = torch.autograd.grad(inner(w, lam.detach()), w)
        with torch.no_grad():
            w -= 0.3 * grad_w
            lam.grad = None
        hg.backward(inner, outer, w, lam)
        with torch.no_grad():
            lam -= 0.05 * lam.grad
        if step in (20, 59):
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated())
    assert torch.isfinite(lam).all() and allocated[1] <= allocated[0], allocated


def test_readme_training_loop_runs():
    """The README's training-loop example is real code: run it."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## In a training loop\s+```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["hg"].stats.residual < 1e-3


# ------------------------------------------------------------- breakdowns: flag, warn once, strict
def _ridge_args(p=6):
    problem = ridge(p=p)
    return problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams


def _slow_divergence_args():
    """f = ½ Σ dᵢwᵢ² − φᵀw with d = (1, 1, 1, 10) and ∂g/∂θ = (1, 1, 1, 10⁻³): with α = 0.21 >
    2/λmax the λmax component grows by 1.1 per term, but after 40 terms the residual (~0.03)
    is still far below ‖v‖; it has grown to 4x its best value, which is the divergence."""
    d = torch.tensor([1.0, 1.0, 1.0, 10.0], dtype=torch.float64)
    c = torch.tensor([1.0, 1.0, 1.0, 1e-3], dtype=torch.float64)
    phi = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    return (
        lambda w, p: 0.5 * (d * w * w).sum() - (p * w).sum(),
        lambda w, p: (c * w).sum(),
        (phi.detach() / d).requires_grad_(),
        phi,
    )


BREAKDOWNS = [  # (mode, options, problem, stats flag, warning text)
    ("implicit-neumann", {"iters": 30, "alpha": 10.0}, _ridge_args, "diverged", "diverged"),
    ("implicit-neumann", {"iters": 40, "alpha": 0.21}, _slow_divergence_args, "diverged", "diverged"),
    (
        "implicit-neumann",
        {"iters": 30, "alpha": 10.0, "residual": False},
        _ridge_args,
        "diverged",
        "diverged",
    ),
    (
        "implicit-neumann",
        {"iters": 40, "alpha": 0.21, "residual": False},
        _slow_divergence_args,
        "diverged",
        "diverged",
    ),
    ("implicit-cg", {}, saddle, "negative_curvature", "negative curvature"),  # problems.py: indefinite H
    ("implicit-nystrom", {"rank": 2, "rho": 1e-3}, singular, "singular", "singular"),  # singular H
    ("implicit-exact", {}, singular, "singular", "singular"),
]


@pytest.mark.parametrize(
    "mode, options, make, flag, text",
    BREAKDOWNS,
    ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BREAKDOWNS)],
)
def test_breakdown_is_flagged_warned_once_and_raised_when_strict(mode, options, make, flag, text):
    args = make()
    hg = HyperGradient(mode, **options)
    with pytest.warns(bilevel.HypergradientWarning, match=f"{mode}: .*{text}.*strict=True"):
        hg.compute(*args)
    assert getattr(hg.stats, flag) and hg.stats.converged is not True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same HyperGradient does not warn a second time
        hg.compute(*args)
    assert getattr(hg.stats, flag)
    with pytest.warns(bilevel.HypergradientWarning, match=text):  # another one warns again
        HyperGradient(mode, **options).compute(*args)

    strict = HyperGradient(mode, strict=True, **options)
    state = copy.deepcopy(strict.state_dict())
    with pytest.raises(bilevel.SolverBreakdownError, match=f"{mode}: .*{text}"):
        strict.backward(*args)
    assert args[3].grad is None and args[2].grad is None  # nothing written
    assert getattr(strict.stats, flag)  # stats still say what happened
    assert _same(strict.state_dict(), state)  # the mode's state (Nyström generator) did not advance


@pytest.mark.parametrize("residual", [True, False])
def test_convergent_neumann_is_not_flagged(residual):
    """The growth criterion stays quiet for a convergent series run down to rounding level."""
    inner, outer, theta, phi = _slow_divergence_args()
    hg = HyperGradient("implicit-neumann", iters=400, alpha=0.19, strict=True, residual=residual)
    grad = hg.compute(inner, outer, theta, phi)
    assert not hg.stats.diverged and hg.stats.converged is (True if residual else None)
    assert torch.allclose(grad, torch.tensor([1.0, 1.0, 1.0, 1e-4], dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------ checkpoint / resume
def _online_ridge(step):
    """The ridge problem of an online loop at outer step ``step``: hparams drift slowly and
    params sit at the inner optimum for them."""
    problem = ridge(p=8)
    lam = (problem.hparams.detach() + 0.05 * step).requires_grad_()
    params = problem.inner_solve(lam.detach()).detach().requires_grad_()
    return problem.inner_loss, problem.outer_loss, params, lam


@pytest.mark.parametrize(
    "mode, options",
    [
        ("implicit-cg", {"warm_start": True, "tol": 1e-10}),
        ("implicit-nystrom", {"rank": 3, "generator": 7}),
    ],
)
def test_stateful_implicit_modes_resume_bit_exactly_from_a_checkpoint(mode, options):
    hg = HyperGradient(mode, **options)
    for step in range(2):
        hg.compute(*_online_ridge(step))
    checkpoint = roundtrip(hg.state_dict())
    expected = [(hg.compute(*_online_ridge(step)), hg.stats.hvps) for step in (2, 3)]

    other = dict(options, generator=11) if mode == "implicit-nystrom" else options
    resumed = HyperGradient(mode, **other)
    resumed.load_state_dict(checkpoint)
    got = [(resumed.compute(*_online_ridge(step)), resumed.stats.hvps) for step in (2, 3)]
    for (a, hvps_a), (b, hvps_b) in zip(expected, got):
        assert torch.equal(a, b) and hvps_a == hvps_b
    # the check can fail: without the checkpoint the calls differ (cold start, other columns)
    fresh = HyperGradient(mode, **other)
    assert not torch.equal(fresh.compute(*_online_ridge(2)), expected[0][0])


@pytest.mark.parametrize(
    "mode, options", [("unroll", {"steps": 3}), ("truncated-unroll", {"steps": 4, "truncate": 2})]
)
def test_unrolled_optimizer_state_resumes_bit_exactly_from_a_checkpoint(mode, options):
    problem = ridge(p=4)
    make = lambda: HyperGradient(mode, update_params=True, momentum=0.9, **options)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    hg = make()
    hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    # torchopt's state holds namedtuples, which torch.load refuses with weights_only=True
    checkpoint = roundtrip({"hg": hg.state_dict(), "theta": theta.detach()}, weights_only=False)
    expected = [hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams) for _ in range(2)]

    resumed = make()
    resumed.load_state_dict(checkpoint["hg"])
    theta2 = checkpoint["theta"].clone().requires_grad_()
    got = [resumed.compute(problem.inner_loss, problem.outer_loss, theta2, problem.hparams) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got)) and torch.equal(theta2, theta)
    # the check can fail: restarting the momentum from zero gives other numbers
    cold = make()
    theta3 = checkpoint["theta"].clone().requires_grad_()
    assert not torch.equal(
        cold.compute(problem.inner_loss, problem.outer_loss, theta3, problem.hparams), expected[0]
    )


def _saved(make, p=3, **load):
    hg = make()
    hg.compute(*shrinkage(p))
    return roundtrip(hg.state_dict(), weights_only=False, **load)


def test_a_checkpoint_loads_only_into_the_configuration_it_was_saved_by():
    adam = _saved(
        lambda: HyperGradient("unroll", steps=2, update_params=True, inner_optimizer=torch.optim.Adam)
    )
    assert adam["signature"] == {"inner_optimizer": "Adam", "backend": "torchopt"}
    with pytest.raises(ValueError, match="inner_optimizer 'Adam' there, 'RMSprop' here"):
        HyperGradient("unroll", update_params=True, inner_optimizer=torch.optim.RMSprop).load_state_dict(adam)
    with pytest.raises(ValueError, match="backend 'torchopt' there, 'higher' here"):
        HyperGradient(
            "unroll", update_params=True, inner_optimizer=torch.optim.Adam, backend="higher"
        ).load_state_dict(adam)
    # the same class with other options: the state's form differs, found at the first call
    momentum = _saved(lambda: HyperGradient("unroll", steps=2, update_params=True, momentum=0.9))
    plain = HyperGradient("unroll", steps=2, update_params=True)
    plain.load_state_dict(momentum)
    with pytest.raises(ValueError, match="does not fit this HyperGradient's inner optimizer.*TraceState"):
        plain.compute(*shrinkage(3))
    same = HyperGradient("unroll", steps=2, update_params=True, momentum=0.9)
    same.load_state_dict(momentum)
    same.compute(*shrinkage(3))  # the matching configuration runs
    # higher's optimizers create their state at the first step: the same check
    adam = _saved(
        lambda: HyperGradient(
            "unroll", steps=2, update_params=True, backend="higher", inner_optimizer=torch.optim.Adam
        )
    )
    amsgrad = HyperGradient(
        "unroll",
        steps=2,
        update_params=True,
        backend="higher",
        inner_optimizer=torch.optim.Adam,
        amsgrad=True,
    )
    amsgrad.load_state_dict(adam)
    with pytest.raises(ValueError, match="does not fit this HyperGradient's inner optimizer"):
        amsgrad.compute(*shrinkage(3))
    same = HyperGradient(
        "unroll", steps=2, update_params=True, backend="higher", inner_optimizer=torch.optim.Adam
    )
    same.load_state_dict(adam)
    same.compute(*shrinkage(3))


@pytest.mark.parametrize(
    "make",
    [
        lambda: HyperGradient("implicit-cg", warm_start=True),
        lambda: HyperGradient("unroll", steps=2, update_params=True, momentum=0.9),
        lambda: HyperGradient("unroll", steps=2, update_params=True, momentum=0.9, backend="higher"),
    ],
)
def test_a_loaded_state_must_fit_the_next_problem(make):
    checkpoint = _saved(make)
    for p, dtype, message in (
        (4, torch.float64, r"params shapes were \(3,\), now \(4,\)"),
        (3, torch.float32, "dtype was float64, now float32"),
    ):
        hg = make()
        hg.load_state_dict(checkpoint)
        with pytest.raises(ValueError, match=f"since the loaded checkpoint \\({message}\\)"):
            hg.compute(*shrinkage(p, dtype))
    hg = make()
    hg.load_state_dict(_saved(make, map_location="meta"))  # torch.load put it on another device
    with pytest.raises(ValueError, match="tensors on meta.*map_location='cpu'"):
        hg.compute(*shrinkage(3))
    hg = make()
    hg.load_state_dict(checkpoint)
    hg.compute(*shrinkage(3))  # the problem it was saved for


@pytest.mark.parametrize(
    "saver, loader",
    [
        (lambda: HyperGradient("implicit-cg", warm_start=True), lambda: HyperGradient("implicit-cg")),
        (
            lambda: HyperGradient("unroll", steps=2, update_params=True, momentum=0.9),
            lambda: HyperGradient("unroll", steps=2, momentum=0.9),
        ),
    ],
)
def test_a_loaded_state_the_options_leave_unused_does_not_bind_the_layout(saver, loader):
    hg = loader()
    hg.load_state_dict(_saved(saver))
    hg.compute(*shrinkage(5))  # warm_start / update_params off: the state is not used


def test_checkpoints_without_signature_or_layout_still_load():
    """Checkpoints written before state_dict() recorded the configuration and layout."""
    make = lambda: HyperGradient("implicit-cg", warm_start=True, tol=1e-12)
    checkpoint = _saved(make)
    old = {"mode": checkpoint["mode"], "state": checkpoint["state"]}
    hg, reference = make(), make()
    hg.load_state_dict(old)
    reference.load_state_dict(checkpoint)
    assert torch.equal(hg.compute(*shrinkage(3)), reference.compute(*shrinkage(3)))
    with pytest.raises(ValueError, match="expects a dict from HyperGradient.state_dict"):
        hg.load_state_dict({"mode": "implicit-cg"})


# --------------------------------------------------- state after calls that raise midway
def test_failed_call_does_not_advance_a_warm_start():
    """The solve succeeds, then the mixed product is non-finite (d√h/dh at h = 0): the
    warm start must still be the one of the last successful call."""
    problem = ridge(p=4)
    inner = lambda w, h: problem.inner_loss(w, h[0]) + torch.sqrt(h[1]) * w.sum()
    hg = HyperGradient("implicit-cg", warm_start=True, tol=1e-10)
    theta = problem.params_star()
    hg.compute(
        inner,
        problem.outer_loss,
        theta,
        (problem.hparams, torch.tensor(1.0, dtype=torch.float64, requires_grad=True)),
    )
    before = copy.deepcopy(hg.state_dict())
    assert before["state"]  # a warm start is held
    moved = (1.5 * theta.detach()).requires_grad_()  # another ∂g/∂θ, so another solution
    zero = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    with pytest.raises(bilevel.NonFiniteError, match="mixed second-derivative product"):
        hg.compute(inner, problem.outer_loss, moved, (problem.hparams, zero))
    assert _same(hg.state_dict(), before)


@pytest.mark.parametrize("mode", ["unroll", "truncated-unroll"])
def test_unrolled_call_that_raises_midway_keeps_params_and_optimizer_state(mode):
    problem = ridge(p=4)
    make = lambda: HyperGradient(
        mode,
        steps=4,
        update_params=True,
        momentum=0.9,
        **({"truncate": 2} if mode == "truncated-unroll" else {}),
    )
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    reference_theta = theta.detach().clone().requires_grad_()
    hg, reference = make(), make()
    hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    reference.compute(problem.inner_loss, problem.outer_loss, reference_theta, problem.hparams)
    state, values = copy.deepcopy(hg.state_dict()), theta.detach().clone()
    calls = {"n": 0}

    def failing_inner(w, lam):  # fails at the third inner step, after two steps were taken
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("data loader failed")
        return problem.inner_loss(w, lam)

    with pytest.raises(RuntimeError, match="data loader failed"):
        hg.compute(failing_inner, problem.outer_loss, theta, problem.hparams)
    assert torch.equal(theta, values) and theta.requires_grad and theta.grad is None
    assert _same(hg.state_dict(), state)
    # and the run goes on exactly as one that never failed
    assert torch.equal(
        hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams),
        reference.compute(problem.inner_loss, problem.outer_loss, reference_theta, problem.hparams),
    )
    assert torch.equal(theta, reference_theta)


def test_a_state_without_use_loads_into_any_configuration():
    """An empty state (no update_params) fits any inner optimizer; a refused load loads nothing."""
    empty = _saved(lambda: HyperGradient("unroll", steps=2))
    assert empty["state"] == {}
    HyperGradient("unroll", steps=2, inner_optimizer=torch.optim.Adam).load_state_dict(empty)
    adam = HyperGradient("unroll", steps=2, update_params=True, inner_optimizer=torch.optim.Adam)
    adam.compute(*shrinkage(3))
    before = copy.deepcopy(adam.state_dict())
    with pytest.raises(ValueError, match="configured otherwise"):
        adam.load_state_dict(
            _saved(lambda: HyperGradient("unroll", steps=2, update_params=True, momentum=0.9))
        )
    assert _same(adam.state_dict(), before)


def test_a_nystrom_checkpoint_loads_wherever_map_location_put_it(device):
    """The generator state is a byte tensor that torch.load moves with everything else; the
    generator takes it back from any device."""
    make = lambda: HyperGradient("implicit-nystrom", rank=2, generator=5)
    hg = make()
    hg.load_state_dict(_saved(make, p=6, map_location=device))  # the state after one draw
    reference = make()
    reference.load_state_dict(_saved(make, p=6))
    assert torch.equal(hg.compute(*_online_ridge(2)), reference.compute(*_online_ridge(2)))
    assert not torch.equal(make().compute(*_online_ridge(2)), reference.compute(*_online_ridge(2)))
