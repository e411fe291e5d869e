"""Unrolled hypergradients in bounded memory: ``checkpoint`` (segments recomputed in the
backward pass) and ``direction="forward"`` (tangents carried through the steps) give the plain
unroll's hypergradient, over the inner optimizers, both backends and hyperparameters in the
loss and in the optimizer; their memory is bounded as documented."""

import copy
import warnings

import pytest
import torch
import torchopt

from bilevel import HyperGradient, HypergradientWarning

from problems import batchnorm_regression, rel_error, ridge, ridge_loss, shrinkage

RMSPROP_WARNING = pytest.mark.filterwarnings("ignore:Differentiable RMSprop")

# (backend, inner optimizer, its options): every optimizer each backend runs, SGD's variants
OPTIMIZERS = [
    ("torchopt", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    ("torchopt", torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
    ("torchopt", torch.optim.Adam, {"lr": 0.05}),
    ("torchopt", torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
    ("torchopt", torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("torchopt", torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5}),
    ("torchopt", torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.sgd(0.1, momentum=0.5)), {}),
    ("torchopt", torchopt.adam(0.05), {}),
    ("higher", torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01}),
    ("higher", torch.optim.Adam, {"lr": 0.05}),
    pytest.param("higher", torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5}, marks=RMSPROP_WARNING),
    ("higher", torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.1}),
]


def _case(optimizer, options, placement, steps=11):
    """Closures, params, hparams and mode options: λ in the loss ("loss"), or also lr as a
    callable of the hparams and SGD's momentum as a hparams tensor ("optimizer")."""
    problem = ridge(p=5)
    h = {"lam": problem.hparams}
    options = dict(options)
    if placement == "optimizer" and isinstance(optimizer, type):
        h["log_lr"] = torch.tensor(options["lr"], dtype=torch.float64).log().requires_grad_()
        options["lr"] = lambda hp: hp["log_lr"].exp()
        if optimizer is torch.optim.SGD and not options.get("nesterov"):  # torchopt: a number
            h["momentum"] = torch.tensor(options["momentum"], dtype=torch.float64, requires_grad=True)
            options["momentum"] = h["momentum"]
    args = (
        lambda w, hp: problem.inner_loss(w, hp["lam"]),
        lambda w, hp: problem.outer_loss(w, hp["lam"]),
        torch.full((5,), 0.5, dtype=torch.float64, requires_grad=True),
        h,
    )
    return args, {"steps": steps, "inner_optimizer": optimizer, **options}


def _flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def _placements():
    """Every optimizer with its settings as hyperparameters (λ is in the loss there too; a
    transformation's settings are fixed when it is built), and with numbers only: the fast
    loop keeps the latter for the transformations and two classes."""
    for case in OPTIMIZERS:
        backend, optimizer, options = case.values if hasattr(case, "values") else case
        marks = list(getattr(case, "marks", ()))
        if isinstance(optimizer, type):
            yield pytest.param(backend, optimizer, options, "optimizer", marks=marks)
        fast = not isinstance(optimizer, type) or (backend, optimizer) in (
            ("torchopt", torch.optim.SGD),
            ("higher", torch.optim.Adam),
        )
        yield pytest.param(
            backend, optimizer, options, "loss", marks=marks + ([] if fast else [pytest.mark.slow])
        )


@pytest.mark.parametrize("backend, optimizer, options, placement", _placements())
def test_checkpointed_and_forward_equal_the_plain_unroll(backend, optimizer, options, placement):
    args, mode_options = _case(optimizer, options, placement)
    params, before = args[2], args[2].detach().clone()
    plain = _flat(HyperGradient("unroll", backend=backend, **mode_options).compute(*args))
    for checkpoint in (3, "auto"):  # 11 steps: segments 2+3+3+3, then 2+3+3+3 (⌈√11⌉ = 4)
        hg = HyperGradient("unroll", backend=backend, checkpoint=checkpoint, **mode_options)
        assert rel_error(_flat(hg.compute(*args)), plain) < 1e-12, checkpoint
        assert hg.stats.extra["checkpoint_segment"] == 3
    forward = HyperGradient("unroll", backend=backend, direction="forward", **mode_options)
    assert rel_error(_flat(forward.compute(*args)), plain) < 1e-10
    assert torch.equal(params, before) and params.grad is None  # the user's params are untouched
    assert all(t.grad is None for t in args[3].values())


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
def test_truncated_unroll_with_checkpoints_and_forward_mode(backend):
    args, options = _case(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "optimizer", steps=12)
    plain = _flat(HyperGradient("truncated-unroll", truncate=8, backend=backend, **options).compute(*args))
    for extra in ({"checkpoint": 3}, {"checkpoint": 8}, {"direction": "forward"}):
        hg = HyperGradient("truncated-unroll", truncate=8, backend=backend, **options, **extra)
        got = hg.compute(*args)
        assert rel_error(_flat(got), plain) < 1e-10, extra


def test_a_transformation_holding_a_hyperparameter():
    """``torchopt.sgd(lr=lr_tensor)`` holds the user's tensor: the checkpointed backward pass
    differentiates it; forward mode cannot make it dual and says what to do instead."""
    problem = ridge(p=4)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    args = (
        lambda w, h: problem.inner_loss(w, h[0]),
        lambda w, h: problem.outer_loss(w, h[0]),
        torch.zeros(4, dtype=torch.float64, requires_grad=True),
        (problem.hparams, lr),
    )
    transformation = torchopt.sgd(lr, momentum=0.5)
    plain = HyperGradient("unroll", steps=9, inner_optimizer=transformation).compute(*args)
    got = HyperGradient("unroll", steps=9, inner_optimizer=transformation, checkpoint=2).compute(*args)
    assert abs(float(plain[1])) > 1e-3
    assert all(rel_error(a, b) < 1e-12 for a, b in zip(got, plain))
    with pytest.raises(ValueError, match="cannot carry tangents.*inner_optimizer=torch.optim.SGD"):
        HyperGradient("unroll", steps=9, inner_optimizer=transformation, direction="forward").compute(*args)
    assert lr.grad is None


def test_inner_batches_are_replayed_in_the_recomputation():
    problem = ridge(p=3)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(8, 3, generator=g, dtype=torch.float64),
            torch.randn(8, generator=g, dtype=torch.float64),
        )
        for _ in range(5)
    ]
    inner = lambda w, lam, batch: ridge_loss(w, lam, *batch)
    w0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    results = {}
    for name, extra in (
        ("plain", {}),
        ("checkpoint", {"checkpoint": 2}),
        ("forward", {"direction": "forward"}),
    ):
        hg = HyperGradient("unroll", steps=7, lr=0.3, momentum=0.5, inner_batches=batches, **extra)
        # two calls: 14 steps over 5 batches; each call draws its 7 batches once
        results[name] = [hg.compute(inner, problem.outer_loss, w0, problem.hparams) for _ in range(2)]
    for name in ("checkpoint", "forward"):
        for got, plain in zip(results[name], results["plain"]):
            assert rel_error(got, plain) < 1e-10, name
    assert rel_error(results["plain"][0], results["plain"][1]) > 1e-3  # other batches


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
def test_update_params_carries_the_same_state(backend):
    problem = ridge(p=4)
    options = {"steps": 5, "inner_optimizer": torch.optim.Adam, "lr": 0.05, "update_params": True}
    runs = {}
    for name, extra in (
        ("plain", {}),
        ("checkpoint", {"checkpoint": 2}),
        ("forward", {"direction": "forward"}),
    ):
        theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        hg = HyperGradient("unroll", backend=backend, **options, **extra)
        grads = [hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams) for _ in range(2)]
        runs[name] = (grads, theta.detach().clone(), hg.state_dict()["state"]["optimizer_state"])
    for name in ("checkpoint", "forward"):
        grads, theta, state = runs[name]
        assert all(rel_error(a, b) < 1e-10 for a, b in zip(grads, runs["plain"][0])), name
        assert torch.allclose(theta, runs["plain"][1], rtol=1e-13, atol=0)
        leaves = torchopt.pytree.tree_leaves(state)
        reference = torchopt.pytree.tree_leaves(runs["plain"][2])
        assert all(
            torch.allclose(a, b, rtol=1e-13, atol=0) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(leaves, reference)
        )


@pytest.mark.slow
def test_a_module_with_batchnorm():
    """Module params and buffers: each segment reruns from its stored buffers, and the
    buffers written back are those after the forward pass."""
    model, decay, inner, outer, x, y = batchnorm_regression(1, model_seed=0, hidden=5, n=16)
    reference = copy.deepcopy(model)
    plain = HyperGradient("unroll", steps=7, update_params=True).compute(inner, outer, reference, decay)
    for extra in ({"checkpoint": 3}, {"direction": "forward"}):
        m = copy.deepcopy(model)
        got = HyperGradient("unroll", steps=7, update_params=True, **extra).compute(inner, outer, m, decay)
        assert float(got) == pytest.approx(float(plain), rel=1e-10), extra
        for key, value in reference.state_dict().items():
            assert torch.allclose(m.state_dict()[key], value, rtol=1e-12, atol=1e-15), (extra, key)


def test_forward_mode_in_float32_keeps_float32_tangents():
    inner, outer, w, h = shrinkage(6, dtype=torch.float32)
    lr = torch.tensor(0.1, requires_grad=True)
    args = (lambda w, hp: inner(w, hp[0]), lambda w, hp: outer(w, hp[0]), w, (h, lr))
    plain = HyperGradient("unroll", steps=8, lr=lr).compute(*args)
    got = HyperGradient("unroll", steps=8, lr=lr, direction="forward").compute(*args)
    assert all(g.dtype == torch.float32 for g in got)
    assert all(rel_error(a, b) < 1e-5 for a, b in zip(got, plain))


def _memory(steps, **options):
    problem = ridge(p=10, n=400)  # a step's graph holds n-vectors, the data n·p floats once
    hg = HyperGradient("unroll", steps=steps, lr=0.1, measure_memory=True, **options)
    hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    return hg.stats.extra


def test_checkpointed_graph_memory_at_100_steps_is_under_a_quarter_of_the_plain_unroll():
    plain, checkpointed = _memory(100), _memory(100, checkpoint="auto")
    assert checkpointed["checkpoint_segment"] == 10
    stored = checkpointed["checkpoint_bytes"]
    assert stored == 9 * 10 * 8  # nine stored starts of θ (plain SGD keeps no state)
    assert checkpointed["saved_bytes_peak"] + stored <= plain["saved_bytes_peak"] / 4


def test_forward_mode_memory_is_flat_in_steps():
    inner, outer, w, h = shrinkage(20)
    memory = []
    for steps in (20, 500):
        hg = HyperGradient("unroll", steps=steps, lr=0.01, direction="forward", measure_memory=True)
        hg.compute(inner, outer, w, h)
        memory.append((hg.stats.extra["saved_bytes_peak"], hg.stats.extra["tangent_bytes"]))
    assert memory[0] == memory[1] and memory[0][1] == 20 * 8  # one tangent of θ
    plain = HyperGradient("unroll", steps=20, lr=0.01, measure_memory=True)
    plain.compute(inner, outer, w, h)
    assert memory[0][0] < plain.stats.extra["saved_bytes_peak"] / 4


def test_options_are_checked_and_refusals_name_the_fix():
    problem = ridge(p=3)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    for bad, error in (("sqrt", TypeError), (0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="option checkpoint must be"):
            HyperGradient("unroll", checkpoint=bad)
    with pytest.raises(ValueError, match="direction must be one of reverse, forward"):
        HyperGradient("unroll", direction="backward")
    with pytest.raises(ValueError, match="checkpoint applies to direction='reverse' only"):
        HyperGradient("truncated-unroll", checkpoint=2, direction="forward")
    with pytest.raises(ValueError, match="3 entries, above max_tangents=2.*direction='reverse'"):
        HyperGradient("unroll", direction="forward", max_tangents=2).compute(*args)
    with pytest.warns(HypergradientWarning, match="3 hyperparameter entries over 3 graph steps"):
        HyperGradient("unroll", steps=3, direction="forward").compute(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HyperGradient("unroll", steps=4, direction="forward").compute(*args)
        # a checkpoint at least as long as the graph steps is the plain unroll
        hg = HyperGradient("truncated-unroll", steps=8, truncate=3, checkpoint=5)
        hg.compute(*args)
        assert "checkpoint_segment" not in hg.stats.extra
    for extra, reason in (({"checkpoint": 2}, "checkpoint"), ({"direction": "forward"}, "direction")):
        with pytest.warns(HypergradientWarning, match=f"runs eagerly because {reason}"):
            HyperGradient("unroll", compile=True, **extra)


def test_a_checkpointed_mode_state_round_trips():
    """``state_dict`` is the optimizer state, whatever the new options: resumes bit-exactly."""
    problem = ridge(p=4)
    make = lambda: HyperGradient(
        "unroll", steps=4, lr=0.1, momentum=0.9, update_params=True, checkpoint="auto"
    )
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    hg = make()
    hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    saved, saved_theta = hg.state_dict(), theta.detach().clone()
    second = hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    resumed = make()
    resumed.load_state_dict(saved)
    again = resumed.compute(
        problem.inner_loss, problem.outer_loss, saved_theta.requires_grad_(), problem.hparams
    )
    assert torch.equal(again, second)
