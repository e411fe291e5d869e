"""The AuxiLearn drop-in ``MetaOptimizer`` and the loss combiners."""

import inspect

import pytest
import torch

from bilevel import HyperGradient, HypergradientWarning, NoDoubleBackwardError
from bilevel.auxiliary import ConvCombiner, LinearCombiner, MetaOptimizer, NonlinearCombiner
from bilevel.testing import assert_hypergradient_close

from problems import _Square

D = torch.float64


def _aux_problem(seed=0, direct=0.0):
    """Linear primary θ (4 features) trained on main + Σ φ_a aux_a (quadratic losses), with
    the inner optimum θ*(φ) in closed form (differentiable in φ). ``direct`` adds φ to the
    validation loss (a direct term ∂g/∂φ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 4, generator=g, dtype=D)
    targets = torch.randn(30, 3, generator=g, dtype=D)  # main, aux1, aux2
    xv = torch.randn(20, 4, generator=g, dtype=D)
    yv = torch.randn(20, generator=g, dtype=D)
    phi = torch.tensor([0.7, 1.3], dtype=D, requires_grad=True)

    def train_loss(theta, phi):
        residuals = ((x @ theta)[:, None] - targets) ** 2  # (B, 3)
        return residuals[:, 0].mean() + (phi * residuals[:, 1:].mean(0)).sum() + 0.05 * (theta**2).sum()

    def val_loss(theta, phi):
        return ((xv @ theta - yv) ** 2).mean() + direct * (phi**2).sum()

    def solve(phi):
        zero = torch.zeros(4, dtype=D)
        h = torch.autograd.functional.hessian(lambda t: train_loss(t, phi), zero, create_graph=True)
        b = -torch.autograd.functional.jacobian(lambda t: train_loss(t, phi), zero, create_graph=True)
        return torch.linalg.solve(h, b)

    return train_loss, val_loss, solve, phi


def _auxilearn_reference(train_loss, val_loss, theta, phi, alpha, k):
    """MATH.md with dense matrices: −(∇²φθ f) Σ_{j=0..K} (I − αH)ʲ ∂g/∂θ (no α, no direct term)."""
    theta, phi = theta.detach(), phi.detach()
    hess = torch.autograd.functional.hessian(lambda t: train_loss(t, phi), theta)
    mixed = torch.autograd.functional.jacobian(
        lambda p: torch.autograd.functional.jacobian(lambda t: train_loss(t, p), theta, create_graph=True),
        phi,
    )
    v = torch.autograd.functional.jacobian(lambda t: val_loss(t, phi), theta)
    step = torch.eye(len(theta), dtype=D) - alpha * hess
    p = sum(torch.linalg.matrix_power(step, j) @ v for j in range(k + 1))
    return -(mixed.T @ p)  # mixed[i, a] = ∂²f/∂θ_i∂φ_a


@pytest.mark.parametrize("k, direct", [(0, 0.0), (3, 0.0), (3, 0.3)])
def test_meta_optimizer_reproduces_auxilearn_formula(k, direct, monkeypatch):
    """k=3: the constructor's defaults (truncate_iter=3, max_grad_norm=10, no clipping needed);
    direct≠0: φ also enters val_loss, and AuxiLearn's formula leaves that direct term out."""
    train_loss, val_loss, solve, phi = _aux_problem(direct=direct)
    theta = solve(phi.detach()).detach().requires_grad_()
    alpha = 0.1
    expected = _auxilearn_reference(train_loss, val_loss, theta, phi, alpha, k)
    assert expected.norm() < 10  # so that the default clipping leaves it alone
    direct_term = 2 * direct * phi.detach()
    assert direct == 0 or not torch.allclose(expected + direct_term, expected, rtol=1e-3)

    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: calls.append(1) or grad(*a, **kw))
    aux = phi.detach().clone().requires_grad_()
    optimizer = torch.optim.SGD([aux], lr=0.5)
    meta = (
        MetaOptimizer(optimizer, alpha)
        if k == 3
        else MetaOptimizer(optimizer, hpo_lr=alpha, truncate_iter=k, max_grad_norm=None)
    )
    (got,) = meta.step(
        train_loss(theta, aux), val_loss(theta, aux), (t for t in [theta]), iter([aux]), return_grads=True
    )
    assert len(calls) == 3 + k  # ∇θf, ∂g/∂θ, K Hessian products, one mixed product: nothing wasted
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-14)
    assert torch.allclose(aux.grad, expected, rtol=1e-10, atol=1e-14)
    assert torch.allclose(aux, phi.detach() - 0.5 * expected, rtol=1e-12)  # the meta step was taken
    assert theta.grad is None  # primary .grad untouched


def test_meta_optimizer_with_implicit_modes_gives_the_ift_hypergradient():
    train_loss, val_loss, solve, phi = _aux_problem(1, direct=0.3)  # with a direct term
    exact = torch.autograd.grad(val_loss(solve(phi), phi), phi)[0]
    theta = solve(phi.detach()).detach().requires_grad_()
    aux = phi.detach().clone().requires_grad_()
    for mode, options in [
        ("implicit-exact", {}),
        ("implicit-cg", {"tol": 1e-12}),
        ("implicit-gmres", {"tol": 1e-12}),
    ]:
        meta = MetaOptimizer(
            torch.optim.SGD([aux], lr=0.0), hpo_lr=0.1, max_grad_norm=None, mode=mode, **options
        )
        (grad,) = meta.step(train_loss(theta, aux), val_loss(theta, aux), [theta], [aux], return_grads=True)
        assert torch.allclose(grad, exact, rtol=1e-9, atol=1e-13), mode
    clipped = MetaOptimizer(
        torch.optim.SGD([aux], lr=0.0), hpo_lr=0.1, max_grad_norm=1e-3, mode="implicit-exact"
    )
    (grad,) = clipped.step(train_loss(theta, aux), val_loss(theta, aux), [theta], [aux], return_grads=True)
    expected = exact * 1e-3 / (exact.norm() + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
    assert torch.allclose(aux.grad, expected, rtol=1e-9) and torch.equal(grad, aux.grad)


def test_meta_optimizer_handles_unused_and_frozen_parameters():
    train_loss, val_loss, solve, phi = _aux_problem(2)
    theta = solve(phi.detach()).detach().requires_grad_()
    spare = torch.zeros(2, dtype=D, requires_grad=True)  # a primary tensor in neither loss
    frozen = torch.ones(3, dtype=D)  # does not require grad: skipped
    spare_aux = torch.ones(3, dtype=D, requires_grad=True)  # not in the training gradient

    reference = _auxilearn_reference(train_loss, val_loss, theta, phi, 0.1, 3)
    meta = MetaOptimizer(torch.optim.SGD([phi, spare_aux], lr=0.0), hpo_lr=0.1, max_grad_norm=None)
    grads = meta.step(
        train_loss(theta, phi),
        val_loss(theta, phi) + (spare_aux**2).sum(),
        [frozen, theta, spare],
        [phi, spare_aux],
        return_grads=True,
    )
    assert torch.allclose(grads[0], reference, rtol=1e-10) and torch.equal(grads[1], torch.zeros(3, dtype=D))

    exact = torch.autograd.grad(val_loss(solve(phi), phi), phi)[0]
    meta = MetaOptimizer(
        torch.optim.SGD([phi, spare_aux], lr=0.0), hpo_lr=0.1, max_grad_norm=None, mode="implicit-exact"
    )
    grads = meta.step(
        train_loss(theta, phi),
        val_loss(theta, phi) + (spare_aux**2).sum(),
        [frozen, theta, spare],
        [phi, spare_aux],
        return_grads=True,
    )
    assert torch.allclose(grads[0], exact, rtol=1e-9)
    assert torch.allclose(grads[1], 2 * spare_aux.detach(), rtol=1e-12)  # the direct term only
    with pytest.raises(ValueError, match=r"parameters\[2\].*affects val_loss but not train_loss"):
        meta.step(
            train_loss(theta, phi),
            val_loss(theta, phi) + spare.sum(),
            [frozen, theta, spare],
            [phi, spare_aux],
        )
    assert spare.grad is None and theta.grad is None


def test_meta_optimizer_warns_about_a_once_differentiable_training_loss():
    train_loss, val_loss, solve, phi = _aux_problem(3)
    theta = solve(phi.detach()).detach().requires_grad_()
    meta = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), hpo_lr=0.1)
    with pytest.warns(HypergradientWarning, match="Square.*@once_differentiable"):
        meta.step(train_loss(theta, phi) + _Square.apply(theta).sum(), val_loss(theta, phi), [theta], [phi])


def test_meta_optimizer_has_auxilearns_signature():
    """Same argument names, defaults and positional order as AuxiLearn's class (MATH.md)."""
    init = inspect.signature(MetaOptimizer.__init__).parameters
    assert list(init)[:5] == ["self", "meta_optimizer", "hpo_lr", "truncate_iter", "max_grad_norm"]
    assert init["truncate_iter"].default == 3 and init["max_grad_norm"].default == 10
    step = inspect.signature(MetaOptimizer.step).parameters
    assert list(step) == ["self", "train_loss", "val_loss", "parameters", "aux_params", "return_grads"]
    assert step["return_grads"].default is False
    train_loss, val_loss, solve, phi = _aux_problem()
    theta = solve(phi.detach()).detach().requires_grad_()
    positional = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), 0.1, 2, None)
    keywords = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), hpo_lr=0.1, truncate_iter=2, max_grad_norm=None)
    a = positional.step(train_loss(theta, phi), val_loss(theta, phi), [theta], [phi], True)
    b = keywords.step(
        train_loss=train_loss(theta, phi),
        val_loss=val_loss(theta, phi),
        parameters=[theta],
        aux_params=[phi],
        return_grads=True,
    )
    assert torch.equal(a[0], b[0])
    assert positional.step(train_loss(theta, phi), val_loss(theta, phi), [theta], [phi]) is None


def test_meta_optimizer_zero_grad_and_the_scale_of_the_true_hypergradient():
    """With H = I/α the default's Neumann terms after the first vanish (p = ∂g/∂θ), so the
    true hypergradient is exactly α times AuxiLearn's (the docstring's retuning advice)."""
    alpha = 0.1
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=D).requires_grad_()
    phi = torch.randn(5, generator=g, dtype=D).requires_grad_()
    target = torch.randn(5, generator=g, dtype=D)
    grads = {}
    for mode in (None, "implicit-exact"):
        train = 0.5 * (theta**2).sum() / alpha - (phi * theta).sum()
        val = 0.5 * ((theta - target) ** 2).sum()
        meta = MetaOptimizer(
            torch.optim.SGD([phi], lr=0.0), hpo_lr=alpha, truncate_iter=3, max_grad_norm=None, mode=mode
        )
        grads[mode] = meta.step(train, val, [theta], [phi], return_grads=True)[0]
        assert phi.grad is not None
        meta.zero_grad()
        assert phi.grad is None
    assert torch.allclose(grads["implicit-exact"], alpha * grads[None], rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["implicit-exact", "implicit-cg"])
def test_meta_optimizer_counts_a_tensor_listed_twice_once_in_implicit_modes(mode):
    """An implicit mode solves for each tensor once (a repeat would make the system singular)
    and writes every listed auxiliary tensor its full gradient. (AuxiLearn's formula, the
    default, keeps AuxiLearn's own handling of a repeat.)"""
    train_loss, val_loss, solve, phi = _aux_problem()
    theta = solve(phi.detach()).detach().requires_grad_()
    step = lambda params, aux: MetaOptimizer(
        torch.optim.SGD([phi], lr=0.0), hpo_lr=0.1, max_grad_norm=None, mode=mode
    ).step(train_loss(theta, phi), val_loss(theta, phi), params, aux, return_grads=True)
    once = step([theta], [phi])
    twice = step([theta, theta], [phi, phi])
    assert len(twice) == 2 and all(torch.allclose(g, once[0], rtol=1e-12, atol=1e-15) for g in twice)


def test_meta_optimizer_errors():
    train_loss, val_loss, solve, phi = _aux_problem()
    theta = solve(phi.detach()).detach().requires_grad_()
    meta = MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1)
    points = torch.randn(1, 5, 4, dtype=D)
    bad_train = train_loss(theta, phi) + phi.sum() * torch.cdist(points, theta.view(1, 1, 4)).sum()
    with pytest.raises(NoDoubleBackwardError, match="_cdist_backward"):
        meta.step(bad_train, val_loss(theta, phi), [theta], [phi])
    for mode in ("implicit-cg", "implicit-exact"):
        bad_train = train_loss(theta, phi) + phi.sum() * torch.cdist(points, theta.view(1, 1, 4)).sum()
        with pytest.raises(NoDoubleBackwardError, match="_cdist_backward"):
            MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1, mode=mode).step(
                bad_train, val_loss(theta, phi), [theta], [phi]
            )
    with pytest.raises(ValueError, match="depends on none of aux_params"):
        meta.step(train_loss(theta, phi.detach()), val_loss(theta, phi), [theta], [phi])
    with pytest.raises(ValueError, match="val_loss must be a scalar"):
        meta.step(train_loss(theta, phi), (theta - 1) ** 2, [theta], [phi])
    with pytest.raises(ValueError, match="aux_params must contain at least one tensor that requires grad"):
        meta.step(train_loss(theta, phi), val_loss(theta, phi), [theta], [])
    with pytest.raises(TypeError, match=r"parameters\[0\] must be a tensor"):
        meta.step(train_loss(theta, phi), val_loss(theta, phi), [theta.tolist()], [phi])
    assert phi.grad is None  # nothing written when a step fails
    for mode in ("unroll", "truncated-unroll"):
        with pytest.raises(ValueError, match="loss tensors.*AuxiliaryLearner"):
            MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1, mode=mode)
    with pytest.raises(TypeError, match="need a mode"):
        MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1, iters=5)
    with pytest.raises(ValueError, match="hpo_lr"):
        MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.0)
    with pytest.raises(ValueError, match="truncate_iter"):
        MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1, truncate_iter=-1)


# --------------------------------------------------------------------------- combiners
def test_linear_combiner():
    losses = torch.rand(8, 3, dtype=D)
    combiner = LinearCombiner(3).double()
    assert torch.allclose(combiner(losses), losses.sum(1).mean(), rtol=1e-14)  # weights start at 1
    skip = LinearCombiner(3, main_skip=True, init=0.5).double()
    assert torch.allclose(skip.weights, torch.tensor([1.0, 0.5, 0.5], dtype=D), rtol=1e-14)
    assert torch.allclose(skip(losses), (losses * skip.weights).sum(1).mean(), rtol=1e-14)
    with torch.no_grad():
        skip.raw.copy_(torch.tensor([-50.0, 3.0], dtype=D))
    assert (skip.weights >= 0).all() and skip.weights[0] == 1.0
    with pytest.raises(ValueError, match="shape \\(B, T\\) with T=3"):
        combiner(torch.rand(8, 4, dtype=D))
    big = LinearCombiner(2, init=1000.0).double()  # log(e^1000 − 1) in a stable form
    assert torch.allclose(big.weights, torch.full((2,), 1000.0, dtype=D), rtol=1e-14)
    assert torch.allclose(
        LinearCombiner(2, init=1e-6).double().weights, torch.full((2,), 1e-6, dtype=D), rtol=1e-9
    )
    for init in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="init must be a finite number > 0"):
            LinearCombiner(3, init=init)
    with pytest.raises(ValueError, match="num_tasks must be an int >= 1"):
        LinearCombiner(0)
    with pytest.raises(ValueError, match="num_tasks must be an int >= 2"):
        LinearCombiner(1, main_skip=True)


def _scrambled(combiner):
    """The combiner with large random (possibly negative) raw parameters: monotonicity must come
    from the construction, not from a lucky initialisation."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in combiner.parameters():
            p.copy_(2 * torch.randn(p.shape, generator=g, dtype=D))
    return combiner


def test_monotone_nonlinear_combiner_never_rewards_a_larger_loss():
    losses = (5 * torch.rand(64, 3, generator=torch.Generator().manual_seed(0), dtype=D)).requires_grad_()
    combiner = _scrambled(NonlinearCombiner(3, hidden=(8, 8), monotone=True).double())
    (slopes,) = torch.autograd.grad(combiner(losses), losses)
    assert (slopes[:, 1:] >= 0).all()  # a larger auxiliary loss never lowers the combined loss
    assert (slopes[:, 0] >= (1 - 1e-12) / 64).all()  # the main loss enters with weight ≥ 1
    free = _scrambled(NonlinearCombiner(3, hidden=(8, 8)).double())
    assert free(losses).shape == () and free(losses) >= losses[:, 0].mean()
    (free_slopes,) = torch.autograd.grad(free(losses), losses)
    assert (
        free_slopes[:, 1:] < -1e-6
    ).any()  # without the constraint some slope is negative: the check bites


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch notes the extra copy
def test_conv_combiner_on_loss_maps():
    torch.manual_seed(0)
    combiner = ConvCombiner(2).double()
    maps = torch.rand(4, 2, 6, 6, dtype=D)
    value = combiner(maps)
    assert value.shape == () and value >= maps[:, 0].mean()
    shifted = maps.clone()
    shifted[:, :, 0, 0] += 1.0  # a change at one pixel moves the weights of its neighbours only
    change = (combiner.net(shifted) - combiner.net(maps)).abs().sum(1)
    assert change[:, :2, :2].min() > 0 and change[:, 3:, :].max() == 0 and change[:, :, 3:].max() == 0
    value.backward()
    assert all(p.grad is not None for p in combiner.parameters())
    with pytest.raises(ValueError, match="\\(B, T, H, W\\)"):
        combiner(torch.rand(4, 2, dtype=D))
    for size in (1, 2, 4):  # every kernel size keeps the map's shape (an even one pads unevenly)
        assert ConvCombiner(2, kernel_size=size).double().net(torch.rand(2, 2, 7, 9, dtype=D)).shape == (
            2,
            2,
            7,
            9,
        )


@pytest.mark.parametrize("mode", [None, "implicit-exact"])
def test_meta_optimizer_accepts_losses_from_one_shared_forward_pass(mode):
    """val_loss and train_loss from one forward pass: backpropagating one must not free the other."""
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=D, requires_grad=True)
    phi = torch.tensor([0.5], dtype=D, requires_grad=True)
    x = torch.randn(10, 3, dtype=D)

    def losses(h):
        return (h**2).mean() + phi[0] * (h**3).mean() + (w**2).sum(), (h.sum(1) ** 2).mean()

    h = torch.tanh(x @ w)
    train, val = losses(h)
    shared = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), hpo_lr=0.1, mode=mode).step(
        train, val, [w], [phi], True
    )
    separate = MetaOptimizer(torch.optim.SGD([phi], lr=0.0), hpo_lr=0.1, mode=mode).step(
        losses(torch.tanh(x @ w))[0], losses(torch.tanh(x @ w))[1], [w], [phi], True
    )
    assert torch.allclose(shared[0], separate[0], rtol=1e-14) and shared[0].abs() > 1e-3


# ------------------------------------------- nonlinear and conv combiners through a hypergradient
def _combiner_problem(combiner, maps: bool):
    """Linear regression θ ∈ R⁴ on three targets (main + two auxiliary), per-sample (or
    per-pixel) squared errors combined by ``combiner``; the outer loss is the main task's error
    on held-out data. Returns (inner_loss, outer_loss, inner_solve, hparams)."""
    g = torch.Generator().manual_seed(0)
    shape = (12, 4, 3, 3) if maps else (24, 4)
    x, xv = torch.randn(*shape, generator=g, dtype=D), torch.randn(*shape, generator=g, dtype=D)
    w = torch.randn(3, 4, generator=g, dtype=D) * torch.tensor([[1.0], [0.8], [-0.5]], dtype=D)
    predict = (
        (lambda inputs, theta: torch.einsum("bchw,c->bhw", inputs, theta))
        if maps
        else (lambda inputs, theta: inputs @ theta)
    )
    truth = (
        (lambda inputs: torch.einsum("bchw,tc->bthw", inputs, w)) if maps else (lambda inputs: inputs @ w.T)
    )
    y, yv = truth(x) + 0.1 * torch.randn(truth(x).shape, generator=g, dtype=D), truth(xv)
    task_axis = 1

    def losses(theta):
        return (predict(x, theta).unsqueeze(task_axis) - y) ** 2

    def inner_loss(theta, phi):
        return torch.func.functional_call(combiner, phi, (losses(theta),)) + 1e-2 * (theta**2).sum()

    def outer_loss(theta, phi):
        return ((predict(xv, theta) - yv.select(task_axis, 0)) ** 2).mean()

    def inner_solve(phi):  # Newton's method on the 4 parameters, to machine precision
        theta = torch.zeros(4, dtype=D, requires_grad=True)
        for _ in range(12):
            (gradient,) = torch.autograd.grad(inner_loss(theta, phi), theta, create_graph=True)
            hessian = torch.stack([torch.autograd.grad(gi, theta, retain_graph=True)[0] for gi in gradient])
            theta = (theta - torch.linalg.solve(hessian, gradient)).detach().requires_grad_()
        return theta.detach()

    hparams = {k: v.detach().clone() for k, v in combiner.named_parameters()}
    return inner_loss, outer_loss, inner_solve, hparams


@pytest.mark.parametrize(
    "make, maps",
    [
        (lambda: NonlinearCombiner(3, hidden=(6,), monotone=True), False),
        (lambda: NonlinearCombiner(3, hidden=(6,)), False),
        (lambda: ConvCombiner(3, hidden_channels=4), True),
    ],
    ids=["nonlinear-monotone", "nonlinear", "conv"],
)
@pytest.mark.parametrize("mode, options", [("implicit-exact", {}), ("implicit-cg", {"tol": 1e-12})])
def test_learned_combiners_get_the_finite_difference_hypergradient(make, maps, mode, options):
    torch.manual_seed(0)
    combiner = make().double()
    inner_loss, outer_loss, inner_solve, hparams = _combiner_problem(combiner, maps)
    for seed in range(3):  # directional derivatives along random directions: two solves each
        computed, fd = assert_hypergradient_close(
            HyperGradient(mode, **options),
            inner_loss,
            outer_loss,
            inner_solve,
            hparams,
            direction="random",
            generator=seed,
        )
        assert abs(float(fd)) > 1e-6  # the combiner's weights matter here


@pytest.mark.parametrize("mode", [None, "implicit-cg"])
def test_swapped_parameters_and_aux_params_are_refused_before_anything_moves(mode):
    """Issue 21: step(train, val, aux, primary) used to return normally, move nothing and
    clear the primary model's .grad."""
    train_loss, val_loss, solve, phi = _aux_problem()
    theta = solve(phi.detach()).detach().requires_grad_()
    theta.grad = torch.ones_like(theta)
    aux = phi.detach().clone().requires_grad_()
    meta = MetaOptimizer(torch.optim.SGD([theta], lr=0.5), hpo_lr=0.1, mode=mode)
    before = theta.detach().clone()
    with pytest.raises(ValueError, match="look swapped"):
        meta.step(train_loss(theta, aux), val_loss(theta, aux.detach()), [aux], [theta])
    assert torch.equal(theta.detach(), before) and torch.equal(theta.grad, torch.ones_like(theta))
    meta = MetaOptimizer(torch.optim.SGD([aux], lr=0.5), hpo_lr=0.1, mode=mode)
    meta.step(train_loss(theta, aux), val_loss(theta, aux.detach()), [theta], [aux])  # the right order
    assert not torch.equal(aux.detach(), phi.detach())
