"""Unrolled modes: closed forms, backend agreement, truncation = Neumann, FD, memory, modules."""

import copy
import functools
import warnings

import pytest
import torch
import torchopt

from bilevel import HyperGradient, HypergradientWarning

from problems import batchnorm_regression, plain_steps, rel_error, ridge, ridge_loss


def _ridge_matrices(problem, lam):
    """f(w) = ½ wᵀA w − bᵀw + const for the ridge problem: A = XᵀX/n + diag(e^λ), b = Xᵀy/n."""
    w = torch.zeros(lam.shape[0], dtype=torch.float64, device=lam.device, requires_grad=True)
    b = -torch.autograd.grad(problem.inner_loss(w, lam.detach()), w)[0]
    a = torch.autograd.functional.hessian(lambda v: problem.inner_loss(v, torch.zeros_like(lam)), w.detach())
    a = a - torch.eye(lam.shape[0], dtype=torch.float64, device=lam.device)  # remove diag(e^0)
    return a + torch.diag(lam.exp()), b


def test_unroll_sgd_equals_the_closed_form_of_the_iterates(device):
    problem = ridge(p=5, device=device)
    theta0 = torch.linspace(-1, 1, 5, dtype=torch.float64, device=device)
    steps, lr = 12, 0.3

    def unrolled_outer(lam):  # θ_T = (I − αA)^T θ0 + Σ_{j<T} (I − αA)^j α b, differentiable in λ
        a, b = _ridge_matrices(problem, lam)
        step = torch.eye(5, dtype=torch.float64, device=device) - lr * a
        theta = torch.linalg.matrix_power(step, steps) @ theta0
        theta = theta + sum(torch.linalg.matrix_power(step, j) @ (lr * b) for j in range(steps))
        return problem.outer_loss(theta, lam)

    lam = problem.hparams.detach().clone().requires_grad_()
    expected = torch.autograd.grad(unrolled_outer(lam), lam)[0]
    for backend in ("torchopt", "higher"):
        hg = HyperGradient("unroll", steps=steps, lr=lr, backend=backend)
        got = hg.compute(
            problem.inner_loss, problem.outer_loss, theta0.clone().requires_grad_(), problem.hparams
        )
        assert rel_error(got, expected) < 1e-10, backend
        assert hg.stats.iters == steps


@pytest.mark.parametrize(
    "optimizer, options",
    [
        (torch.optim.SGD, {"lr": 0.2}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "dampening": 0.3}),
        # higher's Adam adds eps to √v before the bias correction (torch.optim.Adam and torchopt
        # after), an O(eps/√v) difference; with a tiny eps the two formulas coincide
        (torch.optim.Adam, {"lr": 0.05, "eps": 1e-14}),
        (torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.9), "weight_decay": 0.1, "eps": 1e-14}),
        # higher warns that its RMSprop's gradients can be wrong (√ at 0); here they agree
        pytest.param(
            torch.optim.RMSprop,
            {"lr": 0.01, "momentum": 0.5, "centered": True},
            marks=pytest.mark.filterwarnings("ignore:Differentiable RMSprop"),
        ),
        (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.5, "lr_decay": 0.1}),
    ],
)
def test_torchopt_and_higher_backends_agree(optimizer, options):
    problem = ridge(p=6)
    theta0 = torch.full((6,), 0.5, dtype=torch.float64, requires_grad=True)
    args = (problem.inner_loss, problem.outer_loss, theta0, problem.hparams)
    a = HyperGradient("unroll", steps=15, inner_optimizer=optimizer, backend="torchopt", **options).compute(
        *args
    )
    b = HyperGradient("unroll", steps=15, inner_optimizer=optimizer, backend="higher", **options).compute(
        *args
    )
    assert rel_error(a, b) < 1e-10


def test_partial_and_gradient_transformation_are_accepted():
    problem = ridge(p=4)
    theta0 = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    args = (problem.inner_loss, problem.outer_loss, theta0, problem.hparams)
    reference = HyperGradient(
        "unroll", steps=8, inner_optimizer=torch.optim.SGD, lr=0.2, momentum=0.9
    ).compute(*args)
    partial = HyperGradient(
        "unroll", steps=8, inner_optimizer=functools.partial(torch.optim.SGD, lr=0.2, momentum=0.9)
    ).compute(*args)
    transformation = HyperGradient(
        "unroll", steps=8, inner_optimizer=torchopt.sgd(0.2, momentum=0.9)
    ).compute(*args)
    assert rel_error(partial, reference) < 1e-12 and rel_error(transformation, reference) < 1e-12
    adam = HyperGradient("unroll", steps=8, inner_optimizer=torch.optim.Adam, lr=0.05).compute(*args)
    adam_transformation = HyperGradient("unroll", steps=8, inner_optimizer=torchopt.adam(0.05)).compute(*args)
    assert rel_error(adam_transformation, adam) < 1e-12 and rel_error(adam, reference) > 1e-2
    # a class without its options takes torch's defaults (SGD: lr=1e-3) on both backends
    explicit = HyperGradient("unroll", steps=8, inner_optimizer=torch.optim.SGD, lr=1e-3).compute(*args)
    for backend in ("torchopt", "higher"):
        defaults = HyperGradient("unroll", steps=8, inner_optimizer=torch.optim.SGD, backend=backend).compute(
            *args
        )
        assert rel_error(defaults, explicit) < 1e-12, backend


def test_default_options_are_the_documented_ones():
    """No options: 10 steps of SGD with lr=0.1 on torchopt; truncated: the last 5 of them."""
    problem = ridge(p=4)
    theta0 = torch.full((4,), 0.3, dtype=torch.float64)
    args = (problem.inner_loss, problem.outer_loss, theta0.clone().requires_grad_(), problem.hparams)
    expected = torch.autograd.grad(_sgd_unrolled(problem, theta0, 10, 0.1), problem.hparams)[0]
    assert rel_error(HyperGradient("unroll").compute(*args), expected) < 1e-12
    truncated = HyperGradient("truncated-unroll").compute(*args)
    explicit = HyperGradient(
        "truncated-unroll", steps=10, truncate=5, inner_optimizer=torch.optim.SGD, lr=0.1, backend="torchopt"
    ).compute(*args)
    assert torch.equal(truncated, explicit)
    assert rel_error(truncated, expected) > 1e-3  # truncation is on: 5 of the 10 steps carry the graph
    assert rel_error(HyperGradient("truncated-unroll", truncate=10).compute(*args), expected) < 1e-12


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
def test_truncated_unroll_from_the_optimum_equals_neumann(backend):
    problem = ridge(p=6)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    for truncate, alpha in ((1, 0.4), (4, 0.3), (9, 0.5)):
        truncated = HyperGradient(
            "truncated-unroll", steps=20, truncate=truncate, lr=alpha, backend=backend
        ).compute(*args)
        neumann = HyperGradient("implicit-neumann", iters=truncate, alpha=alpha).compute(*args)
        assert rel_error(truncated, neumann) < 1e-10, (truncate, alpha)


def _nonconvex():
    """A tanh model with a learned log input scale; inner: MSE + per-weight decay."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1))
    xv = torch.randn(20, 3, generator=g, dtype=torch.float64)
    yv = torch.sin(xv.sum(1))

    def inner(ws, h):
        hidden = torch.tanh((x * h["scale"].exp()) @ ws["w1"])
        return ((hidden @ ws["w2"] - y) ** 2).mean() + 0.5 * (h["decay"].exp() * ws["w1"] ** 2).sum()

    def outer(ws, h):
        return ((torch.tanh((xv * h["scale"].exp()) @ ws["w1"]) @ ws["w2"] - yv) ** 2).mean()

    params = {
        "w1": 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64),
        "w2": 0.5 * torch.randn(4, generator=g, dtype=torch.float64),
    }
    hparams = {
        "scale": torch.zeros(3, dtype=torch.float64),
        "decay": torch.full((3, 4), -2.0, dtype=torch.float64),
    }
    return inner, outer, params, hparams


@pytest.mark.parametrize(
    "mode, optimizer, options",
    [
        ("unroll", torch.optim.SGD, {"lr": 0.3, "momentum": 0.5}),
        ("truncated-unroll", torch.optim.SGD, {"lr": 0.3, "truncate": 4}),
        ("truncated-unroll", torch.optim.SGD, {"lr": 0.3, "momentum": 0.5, "truncate": 3}),
        ("unroll", torch.optim.Adam, {"lr": 0.05}),
    ],
)
def test_against_finite_differences_of_the_unrolled_map(mode, optimizer, options):
    inner, outer, params, hparams = _nonconvex()
    steps = 10
    truncate = options.pop("truncate", steps)
    base = {k: v.clone() for k, v in hparams.items()}

    def unrolled_map(h):
        """θ_T written with a plain torch optimizer; the first T−K steps see the base hparams
        (truncation differentiates only the last K steps, from θ_{T−K} and its state)."""
        ws = {k: v.clone().requires_grad_() for k, v in params.items()}
        opt = optimizer(ws.values(), **options)
        for step in range(steps):
            opt.zero_grad()
            with torch.enable_grad():
                inner(ws, h if step >= steps - truncate else base).backward()
            opt.step()
        return ws

    hg = HyperGradient(
        mode,
        steps=steps,
        inner_optimizer=optimizer,
        **options,
        **({"truncate": truncate} if mode == "truncated-unroll" else {}),
    )
    got = hg.compute(
        inner,
        outer,
        {k: v.clone().requires_grad_() for k, v in params.items()},
        {k: v.clone().requires_grad_() for k, v in hparams.items()},
    )
    eps = 1e-6
    for key, index in [
        ("scale", (0,)),
        ("scale", (1,)),
        ("scale", (2,)),
        ("decay", (0, 0)),
        ("decay", (2, 3)),
    ]:
        plus = {k: v.clone() for k, v in base.items()}
        minus = {k: v.clone() for k, v in base.items()}
        plus[key][index] += eps
        minus[key][index] -= eps
        with torch.no_grad():
            fd = (outer(unrolled_map(plus), plus) - outer(unrolled_map(minus), minus)) / (2 * eps)
        assert float(got[key][index]) == pytest.approx(float(fd), rel=1e-6, abs=1e-10), (key, index)


def _memory(mode, steps, **options):
    problem = ridge(p=50, n=400)
    hg = HyperGradient(mode, steps=steps, lr=0.1, measure_memory=True, **options)
    hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    return hg.stats.extra["saved_bytes_peak"]


def test_truncated_memory_is_flat_in_steps_and_full_unroll_grows_linearly():
    truncated = [_memory("truncated-unroll", steps, truncate=5) for steps in (10, 40)]
    full = [_memory("unroll", steps) for steps in (10, 20, 40)]
    assert truncated[0] == truncated[1] > 0
    per_step = (full[1] - full[0]) / 10  # graph bytes per step, above a constant (the data)
    assert per_step > 0 and full[2] - full[1] == pytest.approx(20 * per_step, rel=0.05)
    assert truncated[0] == pytest.approx(full[0] - 5 * per_step, rel=0.05)


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
def test_module_with_batchnorm_is_restored_or_updated(backend):
    model, decay, inner, outer, x, y = batchnorm_regression(1, model_seed=0, hidden=5, n=16)
    before = copy.deepcopy(model.state_dict())
    HyperGradient("unroll", steps=5, backend=backend).compute(inner, outer, model, decay)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    # update_params=True: the model ends where 5 plain SGD steps take it, running stats included
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        ((reference(x) - y) ** 2).mean().add(
            decay.detach().exp() * sum((p**2).sum() for p in reference.parameters())
        ).backward()
        opt.step()
    HyperGradient("unroll", steps=5, backend=backend, update_params=True).compute(inner, outer, model, decay)
    for k, v in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, rtol=1e-12, atol=1e-14), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "backend, optimizer, options",
    [
        ("torchopt", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        ("higher", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        ("torchopt", torch.optim.Adam, {"lr": 0.01}),
        ("higher", torch.optim.Adam, {"lr": 0.01, "eps": 1e-14}),  # higher's eps placement: see above
    ],
)
def test_optimizer_state_carries_over_and_resumes(backend, optimizer, options):
    problem = ridge(p=4)
    start = torch.zeros(4, dtype=torch.float64)
    make = lambda: HyperGradient(
        "unroll", steps=3, inner_optimizer=optimizer, backend=backend, update_params=True, **options
    )
    # two calls of 3 steps with carried state == 6 plain optimizer steps
    theta = start.clone().requires_grad_()
    hg = make()
    hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    saved_state, saved_theta = hg.state_dict(), theta.detach().clone()
    second = hg.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    plain = plain_steps(
        lambda w: problem.inner_loss(w, problem.hparams.detach()), start, optimizer, 6, **options
    )
    assert torch.allclose(theta, plain, rtol=1e-10, atol=1e-14)
    # resume from state_dict: bit-exact
    resumed = make()
    resumed.load_state_dict(saved_state)
    theta2 = saved_theta.clone().requires_grad_()
    again = resumed.compute(problem.inner_loss, problem.outer_loss, theta2, problem.hparams)
    assert torch.equal(again, second) and torch.equal(theta2, theta)


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
def test_learning_rate_and_momentum_as_hyperparameters(backend):
    problem = ridge(p=4)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    momentum = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    theta0 = torch.zeros(4, dtype=torch.float64)

    def run(lr_value, momentum_value):
        w = theta0.clone()
        buf = None
        for _ in range(6):
            g = torch.autograd.grad(
                problem.inner_loss(w.requires_grad_() if not w.requires_grad else w, problem.hparams),
                w,
                create_graph=True,
            )[0]
            buf = g if buf is None else momentum_value * buf + g
            w = w - lr_value * buf
        return problem.outer_loss(w, problem.hparams)

    lr2, mom2 = lr.detach().clone().requires_grad_(), momentum.detach().clone().requires_grad_()
    with torch.enable_grad():
        expected = torch.autograd.grad(run(lr2, mom2), (lr2, mom2))
    hg = HyperGradient("unroll", steps=6, lr=lr, momentum=momentum, backend=backend)
    got = hg.compute(
        lambda w, h: problem.inner_loss(w, h[0]),
        lambda w, h: problem.outer_loss(w, h[0]),
        theta0.clone().requires_grad_(),
        (problem.hparams, lr, momentum),
    )
    assert torch.allclose(got[1], expected[0], rtol=1e-10) and torch.allclose(got[2], expected[1], rtol=1e-10)


def _sgd_unrolled(problem, theta0, steps, lr, decay=0.0):
    """The outer loss after `steps` hand-written SGD steps (weight decay `decay`), differentiable."""
    w = theta0.clone().requires_grad_()
    for _ in range(steps):
        g = torch.autograd.grad(problem.inner_loss(w, problem.hparams), w, create_graph=True)[0]
        w = w - lr * (g + decay * w)
    return problem.outer_loss(w, problem.hparams)


@pytest.mark.parametrize("backend", ["torchopt", "higher"])
def test_learning_rate_as_a_callable_of_the_hparams(backend):
    problem = ridge(p=4)
    theta0 = torch.zeros(4, dtype=torch.float64)
    h = {"lam": problem.hparams, "log_lr": torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)}
    log_lr = h["log_lr"].detach().clone().requires_grad_()
    expected = torch.autograd.grad(_sgd_unrolled(problem, theta0, 6, log_lr.exp()), log_lr)[0]
    for mode, options in (("unroll", {}), ("truncated-unroll", {"truncate": 6})):
        hg = HyperGradient(mode, steps=6, lr=lambda hp: hp["log_lr"].exp(), backend=backend, **options)
        got = hg.compute(
            lambda w, hp: problem.inner_loss(w, hp["lam"]),
            lambda w, hp: problem.outer_loss(w, hp["lam"]),
            theta0.clone().requires_grad_(),
            h,
        )
        assert float(got["log_lr"]) == pytest.approx(float(expected), rel=1e-10), mode


def test_weight_decay_as_a_hyperparameter_needs_higher():
    problem = ridge(p=4)
    theta0 = torch.full((4,), 0.5, dtype=torch.float64)
    decay = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    reference = decay.detach().clone().requires_grad_()
    expected = torch.autograd.grad(_sgd_unrolled(problem, theta0, 5, 0.2, reference), reference)[0]
    args = (
        lambda w, h: problem.inner_loss(w, h[0]),
        lambda w, h: problem.outer_loss(w, h[0]),
        theta0.clone().requires_grad_(),
        (problem.hparams, decay),
    )
    got = HyperGradient("unroll", steps=5, lr=0.2, weight_decay=decay, backend="higher").compute(*args)
    assert float(got[1]) == pytest.approx(float(expected), rel=1e-10)
    with pytest.raises(
        ValueError,
        match="backend='torchopt' cannot differentiate the inner optimizer's "
        "weight_decay.*use backend='higher', which can",
    ):
        HyperGradient("unroll", steps=5, lr=0.2, weight_decay=decay).compute(*args)
    with pytest.raises(ValueError, match="cannot differentiate.*weight_decay.*no backend can: pass a number"):
        HyperGradient("unroll", inner_optimizer=torch.optim.AdamW, weight_decay=decay).compute(*args)


def test_inner_batches_feed_one_batch_per_step():
    problem = ridge(p=3)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(8, 3, generator=g, dtype=torch.float64),
            torch.randn(8, generator=g, dtype=torch.float64),
        )
        for _ in range(4)
    ]
    seen = []

    def inner(w, lam, batch):
        seen.append(batch)
        x, y = batch
        return ridge_loss(w, lam, x, y)

    hg = HyperGradient("unroll", steps=3, lr=0.1, inner_batches=batches)
    w0 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    hg.compute(inner, problem.outer_loss, w0, problem.hparams)
    hg.compute(inner, problem.outer_loss, w0, problem.hparams)
    # 6 steps over 4 batches: the list starts over after the 4th
    assert [id(b) for b in seen] == [id(batches[i]) for i in (0, 1, 2, 3, 0, 1)]
    once = HyperGradient("unroll", steps=3, inner_batches=iter(batches[:2]))
    with pytest.raises(ValueError, match="inner_batches ran out"):
        once.compute(inner, problem.outer_loss, w0, problem.hparams)


def test_bad_input_errors():
    problem = ridge(p=3)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    with pytest.raises(ValueError, match="truncate=8 exceeds steps=5"):
        HyperGradient("truncated-unroll", steps=5, truncate=8)
    with pytest.raises(TypeError, match="GradientTransformation cannot run on backend='higher'"):
        HyperGradient("unroll", inner_optimizer=torchopt.sgd(0.1), backend="higher")
    with pytest.raises(TypeError, match="unknown option.*betas.*inner optimizer's are: lr, momentum"):
        HyperGradient("unroll", betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="inner_optimizer must be a torch optimizer class"):
        HyperGradient("unroll", inner_optimizer="sgd")
    with pytest.raises(ValueError, match="backend must be one of torchopt, higher"):
        HyperGradient("unroll", backend="jax")
    # an optimizer type: refused at construction, naming the backend that has it, if any
    for backend in ("torchopt", "higher"):
        with pytest.raises(
            TypeError,
            match=f"LBFGS has no differentiable version on backend='{backend}'; "
            "neither backend has it: use one of SGD, Adam.*Rprop",
        ):
            HyperGradient("unroll", inner_optimizer=torch.optim.LBFGS, backend=backend)
    with pytest.raises(
        TypeError,
        match="Adamax has no differentiable version on backend='torchopt'; "
        "use backend='higher', which has it",
    ):
        HyperGradient("unroll", inner_optimizer=functools.partial(torch.optim.Adamax, lr=0.1))
    with pytest.raises(
        TypeError,
        match="AdamW has no differentiable version on backend='higher'; use backend='torchopt', which has it",
    ):
        HyperGradient("truncated-unroll", inner_optimizer=torch.optim.AdamW, backend="higher")
    with pytest.raises(TypeError, match="amsgrad=True; use backend='higher'"):
        HyperGradient("unroll", inner_optimizer=torch.optim.Adam, amsgrad=True).compute(*args)
    stray_lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(
        ValueError, match="option lr is a tensor that requires grad but is not one of the hparams"
    ):
        HyperGradient("unroll", lr=stray_lr).compute(*args)
    with pytest.raises(ValueError, match="option betas holds a tensor that requires grad; only scalar"):
        HyperGradient("unroll", inner_optimizer=torch.optim.Adam, betas=(stray_lr, 0.999)).compute(*args)
    with pytest.raises(ValueError, match="option lr must be a scalar tensor"):
        HyperGradient("unroll", lr=lambda h: h.exp()).compute(*args)
    with pytest.raises(
        TypeError, match="higher's differentiable SGD ignores maximize=True; use backend='torchopt'"
    ):
        HyperGradient("unroll", maximize=True, backend="higher").compute(*args)


def _adam_unrolled(problem, lam, theta0, steps, lr, eps, betas=(0.9, 0.999), old_eps=False):
    """The outer loss after hand-written Adam steps, differentiable in ``lam``. torch.optim.Adam
    and torchopt: θ −= lr·m̂/(√v̂ + eps) with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ); the older form (higher):
    θ −= lr·√(1−β₂ᵗ)/(1−β₁ᵗ)·m/(√v + eps), i.e. eps/√(1−β₂ᵗ) in place of eps."""
    w, m, v = theta0.clone().requires_grad_(), torch.zeros_like(theta0), torch.zeros_like(theta0)
    for t in range(1, steps + 1):
        g = torch.autograd.grad(problem.inner_loss(w, lam), w, create_graph=True)[0]
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
        if old_eps:
            w = w - lr * c2**0.5 / c1 * m / (v.sqrt() + eps)
        else:
            w = w - lr * (m / c1) / ((v / c2).sqrt() + eps)
    return problem.outer_loss(w, lam)


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_adam_backends_each_follow_their_documented_eps_placement(eps):
    """The backends agree on Adam only up to where eps enters (see the agreement test, which
    uses a negligible eps); at real eps values each matches its own formula to 1e-10, and the
    two formulas differ by more than that, so each check tells the placements apart."""
    problem = ridge(p=6)
    theta0 = torch.full((6,), 0.5, dtype=torch.float64)
    expected = {}
    for backend in ("torchopt", "higher"):
        lam = problem.hparams.detach().clone().requires_grad_()
        outer = _adam_unrolled(problem, lam, theta0, 15, 0.05, eps, old_eps=backend == "higher")
        expected[backend] = torch.autograd.grad(outer, lam)[0]
        got = HyperGradient(
            "unroll", steps=15, inner_optimizer=torch.optim.Adam, lr=0.05, eps=eps, backend=backend
        ).compute(problem.inner_loss, problem.outer_loss, theta0.clone().requires_grad_(), problem.hparams)
        assert rel_error(got, expected[backend]) < 1e-10, backend
    assert rel_error(expected["torchopt"], expected["higher"]) > 1e-8


def test_a_gradient_transformation_is_fresh_on_every_call():
    """torchopt keeps its momentum's first-update flag in the transformation: a second call
    (or a carried state) must still follow torch's rule (first buffer = g, no dampening)."""
    problem = ridge(p=4)
    theta0 = torch.zeros(4, dtype=torch.float64)
    options = {"lr": 0.1, "momentum": 0.5, "dampening": 0.3}
    args = (problem.inner_loss, problem.outer_loss, theta0.clone().requires_grad_(), problem.hparams)
    reference = HyperGradient("unroll", steps=5, inner_optimizer=torch.optim.SGD, **options).compute(*args)
    hg = HyperGradient("unroll", steps=5, inner_optimizer=torchopt.sgd(**options))
    for call in range(3):
        assert rel_error(hg.compute(*args), reference) < 1e-12, call
    assert rel_error(reference, HyperGradient("unroll", steps=5, lr=0.1, momentum=0.5).compute(*args)) > 1e-3

    theta = theta0.clone().requires_grad_()  # online: two calls of 3 steps == 6 plain steps
    online = HyperGradient("unroll", steps=3, inner_optimizer=torchopt.sgd(**options), update_params=True)
    for _ in range(2):
        online.compute(problem.inner_loss, problem.outer_loss, theta, problem.hparams)
    plain = plain_steps(
        lambda w: problem.inner_loss(w, problem.hparams.detach()), theta0, torch.optim.SGD, 6, **options
    )
    assert torch.allclose(theta, plain, rtol=1e-12, atol=1e-15)


def test_a_gradient_transformation_built_with_a_hyperparameter_is_differentiated():
    """``torchopt.sgd(lr=lr_tensor)`` with ``lr_tensor`` in hparams: the transformation holds the
    user's tensor, and the hypergradient must still flow to it (not come back as zero)."""
    problem = ridge(p=4)
    theta0 = torch.zeros(4, dtype=torch.float64)
    lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    reference = lr.detach().clone().requires_grad_()
    expected = torch.autograd.grad(_sgd_unrolled(problem, theta0, 6, reference), (problem.hparams, reference))
    for mode, options in (("unroll", {}), ("truncated-unroll", {"truncate": 6})):
        got = HyperGradient(mode, steps=6, inner_optimizer=torchopt.sgd(lr), **options).compute(
            lambda w, h: problem.inner_loss(w, h[0]),
            lambda w, h: problem.outer_loss(w, h[0]),
            theta0.clone().requires_grad_(),
            (problem.hparams, lr),
        )
        assert rel_error(got[0], expected[0]) < 1e-12 and abs(float(expected[1])) > 1e-3, mode
        assert float(got[1]) == pytest.approx(float(expected[1]), rel=1e-10), mode
    assert lr.grad is None


def test_module_with_batchnorm_unrolls_correctly():
    """The hypergradient through 5 steps of a BatchNorm model equals a finite difference of the
    map decay -> outer loss after 5 plain SGD steps (training mode: batch statistics)."""
    model, decay, inner, outer, x, y = batchnorm_regression(1, model_seed=0, hidden=5, n=16)

    def unrolled_outer(d):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            inner(m, d).backward()
            opt.step()
        with torch.no_grad():
            return outer(m, d)

    got = HyperGradient("unroll", steps=5).compute(inner, outer, model, decay)
    eps = 1e-6
    fd = (unrolled_outer(decay.detach() + eps) - unrolled_outer(decay.detach() - eps)) / (2 * eps)
    assert abs(float(fd)) > 1e-4 and float(got) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_plain_sgd_takes_one_fused_step_and_equals_torchopts_update(monkeypatch, fused):
    """Plain SGD (no momentum, weight decay or maximize) on the torchopt backend computes
    θ − lr·g itself: one ``torch._foreach_add`` per step (the eager tuple algebra; per-tensor
    ops without ``fused``, as under ``torch.compile``) instead of torchopt's multiply and add
    per tensor. Its hypergradient equals the one through torchopt's own update (momentum 0
    given as a transformation) and higher's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from bilevel._src import tree_math as solvers

    class FusedAdds(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            FusedAdds.count += func.overloadpacket is torch.ops.aten._foreach_add
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(solvers, "_fused", lambda: fused)
    problem = ridge(p=6)
    weights = (torch.full((6,), 0.5, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    inner = lambda ps, lam: problem.inner_loss(ps[0], lam) + ps[1] ** 2
    outer = lambda ps, lam: problem.outer_loss(ps[0], lam) + ps[1]
    args = (inner, outer, tuple(w.clone().requires_grad_() for w in weights), problem.hparams)
    with FusedAdds():
        got = HyperGradient("unroll", steps=7, lr=0.2).compute(*args)
    assert FusedAdds.count == (7 if fused else 0)
    through_torchopt = HyperGradient("unroll", steps=7, inner_optimizer=torchopt.sgd(lr=0.2)).compute(*args)
    through_higher = HyperGradient("unroll", steps=7, lr=0.2, backend="higher").compute(*args)
    assert rel_error(got, through_torchopt) < 1e-13
    assert rel_error(got, through_higher) < 1e-13
    if fused:
        FusedAdds.count = 0
        with FusedAdds():  # momentum: torchopt's update, not the direct step
            HyperGradient("unroll", steps=7, lr=0.2, momentum=0.5).compute(*args)
        assert FusedAdds.count == 0


def test_a_copy_of_the_initialisation_as_params_warns_of_a_zero_hypergradient():
    """Issue 21: a copy of the init as params (not MAML) gives an exactly zero hypergradient,
    which must not pass silently."""
    init = torch.randn(3, dtype=torch.float64, requires_grad=True)
    duplicate = init.detach().clone().requires_grad_()
    x = torch.randn(10, 3, dtype=torch.float64)
    inner, outer = (lambda w, h: ((x @ w) ** 2).mean()), (lambda w, h: ((x @ w - 1) ** 2).mean())
    hg = HyperGradient("unroll", steps=3)
    with pytest.warns(HypergradientWarning, match="hypergradient is zero: no hparam reaches") as caught:
        grad = hg.compute(inner, outer, duplicate, init)
    assert "same tensors or module" in str(caught[0].message) and caught[0].filename == __file__
    assert torch.equal(grad, torch.zeros(3, dtype=torch.float64))
    maml = hg.compute(inner, outer, init, init)
    assert maml.abs().max() > 0


def test_an_hparam_passed_as_a_number_where_it_acts_is_named():
    """momentum=0.5 instead of momentum=hparams['momentum'] gave that hparam an exactly zero
    hypergradient, silently."""
    x = torch.randn(10, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    values = {"log_lr": -2.0, "momentum": 0.5}
    hp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}
    inner, outer = (lambda w, h: ((x @ w - 1) ** 2).mean()), (lambda w, h: ((x @ w) ** 2).mean())
    hg = HyperGradient("unroll", steps=3, lr=lambda h: h["log_lr"].exp(), momentum=0.5)
    with pytest.warns(HypergradientWarning, match=r"hparams\['momentum'\] reach\(es\) neither"):
        grads = hg.compute(inner, outer, w, hp)
    assert grads["momentum"] == 0 and grads["log_lr"] != 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*reach")
        HyperGradient("unroll", steps=3, lr=lambda h: h["log_lr"].exp(), momentum=hp["momentum"]).compute(
            inner, outer, w, hp
        )
