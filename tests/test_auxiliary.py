"""Auxiliary learning: AuxiLearn drop-in, the learner with every mode, combiners, module-aware weights."""
import copy
import warnings

import pytest
import torch
from torch import nn

import bilevel
from bilevel import HyperGradient, NoDoubleBackwardError
from bilevel.auxiliary import (AuxiliaryLearner, ConvCombiner, LinearCombiner, MetaOptimizer, ModuleAwareWeights,
                               NonlinearCombiner, module_groups)

D = torch.float64


def _aux_problem(seed=0):
    """Linear primary θ (4 features) trained on main + Σ φ_a aux_a (quadratic losses); the
    exact inner optimum in closed form. Returns a function giving (θ*, train_loss, val_loss)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 4, generator=g, dtype=D)
    targets = torch.randn(30, 3, generator=g, dtype=D)  # main, aux1, aux2
    xv = torch.randn(20, 4, generator=g, dtype=D)
    yv = torch.randn(20, generator=g, dtype=D)
    phi = torch.tensor([0.7, 1.3], dtype=D, requires_grad=True)

    def train_loss(theta, phi):
        residuals = ((x @ theta)[:, None] - targets) ** 2  # (B, 3)
        return residuals[:, 0].mean() + (phi * residuals[:, 1:].mean(0)).sum() + 0.05 * (theta ** 2).sum()

    def val_loss(theta, phi):
        return ((xv @ theta - yv) ** 2).mean()

    def solve(phi):  # differentiable in phi
        zero = torch.zeros(4, dtype=D)
        h = torch.autograd.functional.hessian(lambda t: train_loss(t, phi), zero, create_graph=True)
        b = -torch.autograd.functional.jacobian(lambda t: train_loss(t, phi), zero, create_graph=True)
        return torch.linalg.solve(h, b)

    return train_loss, val_loss, solve, phi


def test_meta_optimizer_reproduces_auxilearn_formula():
    train_loss, val_loss, solve, phi = _aux_problem()
    theta = solve(phi.detach()).detach().requires_grad_()
    alpha, k = 0.1, 3
    # independent reference from MATH.md, with dense matrices
    hess = torch.autograd.functional.hessian(lambda t: train_loss(t, phi.detach()), theta.detach())
    mixed = torch.autograd.functional.jacobian(
        lambda p: torch.autograd.functional.jacobian(lambda t: train_loss(t, p), theta.detach(), create_graph=True),
        phi.detach())  # (θ, φ)
    v = torch.autograd.grad(val_loss(theta, phi), theta)[0]
    step = torch.eye(4, dtype=D) - alpha * hess
    p = sum(torch.linalg.matrix_power(step, j) @ v for j in range(k + 1))
    expected = -(mixed.T @ p)

    aux = phi.detach().clone().requires_grad_()
    meta = MetaOptimizer(torch.optim.SGD([aux], lr=0.5), hpo_lr=alpha, truncate_iter=k, max_grad_norm=None)
    (grad,) = meta.step(train_loss(theta, aux), val_loss(theta, aux), (t for t in [theta]), iter([aux]),
                        return_grads=True)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-14)
    assert torch.allclose(aux, phi.detach() - 0.5 * expected, rtol=1e-12)  # the meta step was taken
    assert theta.grad is None  # primary .grad untouched


def test_meta_optimizer_with_an_implicit_mode_gives_the_ift_hypergradient():
    train_loss, val_loss, solve, phi = _aux_problem(1)
    exact = torch.autograd.grad(val_loss(solve(phi), phi), phi)[0]
    theta = solve(phi.detach()).detach().requires_grad_()
    aux = phi.detach().clone().requires_grad_()
    for mode in ("implicit-exact", "implicit-cg"):
        meta = MetaOptimizer(torch.optim.SGD([aux], lr=0.0), hpo_lr=0.1, max_grad_norm=None, mode=mode)
        (grad,) = meta.step(train_loss(theta, aux), val_loss(theta, aux), [theta], [aux], return_grads=True)
        assert torch.allclose(grad, exact, rtol=1e-8), mode
    clipped = MetaOptimizer(torch.optim.SGD([aux], lr=0.0), hpo_lr=0.1, max_grad_norm=1e-3, mode="implicit-exact")
    clipped.step(train_loss(theta, aux), val_loss(theta, aux), [theta], [aux])
    assert float(aux.grad.norm()) == pytest.approx(1e-3, rel=1e-4)


def test_meta_optimizer_handles_unused_parameters():
    train_loss, val_loss, solve, phi = _aux_problem(2)
    theta = solve(phi.detach()).detach().requires_grad_()
    spare_primary = torch.zeros(2, dtype=D, requires_grad=True)  # in neither loss
    spare_aux = torch.ones(3, dtype=D, requires_grad=True)  # not in the training gradient
    meta = MetaOptimizer(torch.optim.SGD([phi, spare_aux], lr=0.1), hpo_lr=0.1)
    grads = meta.step(train_loss(theta, phi), val_loss(theta, phi) + 0 * spare_primary.sum(),
                      [theta, spare_primary], [phi, spare_aux], return_grads=True)
    assert torch.equal(grads[1], torch.zeros(3, dtype=D)) and torch.isfinite(grads[0]).all()


def test_meta_optimizer_errors():
    train_loss, val_loss, solve, phi = _aux_problem()
    theta = solve(phi.detach()).detach().requires_grad_()
    points = torch.randn(1, 5, 4, dtype=D)
    bad_train = train_loss(theta, phi) + phi.sum() * torch.cdist(points, theta.view(1, 1, 4)).sum()
    with pytest.raises(NoDoubleBackwardError, match="_cdist_backward"):
        MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1).step(bad_train, val_loss(theta, phi), [theta], [phi])
    with pytest.raises(ValueError, match="implicit modes only.*AuxiliaryLearner"):
        MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1, mode="unroll").step(
            train_loss(theta, phi), val_loss(theta, phi), [theta], [phi])
    with pytest.raises(ValueError, match="val_loss must be a scalar"):
        MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1).step(
            train_loss(theta, phi), (theta - 1) ** 2, [theta], [phi])
    with pytest.raises(ValueError, match="aux_params must be a non-empty"):
        MetaOptimizer(torch.optim.SGD([phi], lr=0.1), hpo_lr=0.1).step(
            train_loss(theta, phi), val_loss(theta, phi), [theta], [])


# ----------------------------------------------------------------------------- learner
def _learner(mode, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=g, dtype=D)
    y = (x[:, 0] > 0).long()
    aux_targets = torch.stack([(x[:, 1] > 0), (x[:, 0] + x[:, 1] > 0)], 1).long()
    # a shared layer, then a main head (2 logits) and two auxiliary heads (2 each)
    primary = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2 + 2 * 2)).double()
    combiner = LinearCombiner(3, main_skip=True).double()

    def per_task_losses(model, batch):
        xb, yb, ab = batch
        logits = model(xb)
        ce = nn.functional.cross_entropy
        return torch.stack([ce(logits[:, 0:2], yb, reduction="none"), ce(logits[:, 2:4], ab[:, 0], reduction="none"),
                            ce(logits[:, 4:6], ab[:, 1], reduction="none")], 1)

    learner = AuxiliaryLearner(
        primary, combiner,
        train_loss=lambda p, a, batch: a(per_task_losses(p, batch)) + 1e-2 * sum((w ** 2).sum() for w in p.parameters()),
        main_loss=lambda p, batch: nn.functional.cross_entropy(p(batch[0])[:, 0:2], batch[1]),
        primary_optimizer=torch.optim.SGD(primary.parameters(), lr=0.3, momentum=0.9),
        auxiliary_optimizer=torch.optim.Adam(combiner.parameters(), lr=0.05),
        hypergradient=HyperGradient(mode), update_every=2)
    train = (x[:48], y[:48], aux_targets[:48])
    aux = (x[48:], y[48:], aux_targets[48:])
    return learner, train, aux


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")
@pytest.mark.parametrize("mode", bilevel.available_modes())
def test_learner_runs_with_every_mode_and_resumes_exactly(mode):
    learner, train, aux = _learner(mode)
    before = learner.auxiliary.raw.detach().clone()
    infos = [learner.step(train, aux) for _ in range(2)]
    assert [i["auxiliary_updated"] for i in infos] == [False, True]
    assert infos[1]["hypergradient"].mode == mode
    state = copy.deepcopy(learner.state_dict())
    for _ in range(2):
        learner.step(train, aux)
    after = learner.auxiliary.raw.detach().clone()
    assert not torch.equal(after, before) and torch.isfinite(after).all()

    resumed, _, _ = _learner(mode, seed=5)  # different initial weights, overwritten by the state
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step(train, aux)
    assert torch.equal(resumed.auxiliary.raw, learner.auxiliary.raw)
    for a, b in zip(resumed.primary.parameters(), learner.primary.parameters()):
        assert torch.equal(a, b)


def test_learner_validates_arguments():
    learner, _, _ = _learner("implicit-cg")
    with pytest.raises(ValueError, match="update_every"):
        AuxiliaryLearner(learner.primary, learner.auxiliary, learner.train_loss, learner.main_loss,
                         learner.primary_optimizer, learner.auxiliary_optimizer, update_every=0)


# --------------------------------------------------------------------------- combiners
def test_linear_combiner():
    losses = torch.rand(8, 3, dtype=D)
    combiner = LinearCombiner(3).double()
    assert torch.allclose(combiner(losses), losses.sum(1).mean())  # weights start at 1
    skip = LinearCombiner(3, main_skip=True, init=0.5).double()
    assert torch.allclose(skip.weights, torch.tensor([1.0, 0.5, 0.5], dtype=D))
    with torch.no_grad():
        skip.raw.fill_(-50.0)
    assert (skip.weights >= 0).all()
    with pytest.raises(ValueError, match="shape \\(B, T\\) with T=3"):
        combiner(torch.rand(8, 4, dtype=D))


def test_monotone_nonlinear_combiner_never_rewards_a_larger_loss():
    torch.manual_seed(0)
    combiner = NonlinearCombiner(3, hidden=(8, 8), monotone=True).double()
    losses = torch.rand(16, 3, dtype=D)
    base = combiner(losses)
    for t in range(3):
        bumped = losses.clone()
        bumped[:, t] += 0.5
        assert combiner(bumped) >= base
    free = NonlinearCombiner(3).double()
    assert free(losses).shape == ()


def test_conv_combiner_on_loss_maps():
    combiner = ConvCombiner(2).double()
    maps = torch.rand(4, 2, 6, 6, dtype=D)
    value = combiner(maps)
    assert value.shape == () and value >= maps[:, 0].mean()
    value.backward()
    assert all(p.grad is not None for p in combiner.parameters())
    with pytest.raises(ValueError, match="\\(B, T, H, W\\)"):
        combiner(torch.rand(4, 2, dtype=D))


# ------------------------------------------------------------------------- module-aware
class _TwoModules(nn.Module):
    """Prediction = enc1(x) + enc2(x²) + head(x): each task target is linear in the parameters,
    so G(θ) is linear and its fixed point is one linear solve."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Linear(3, 3, bias=False)
        self.enc2 = nn.Linear(3, 3, bias=False)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.enc1(x) + self.enc2(x ** 2) + 0.1 * self.head(x)


def _maoal():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=D)
    targets = torch.randn(40, 3, generator=g, dtype=D)  # column t: task t (main, aux1, aux2)
    xd = torch.randn(25, 3, generator=g, dtype=D)
    yd = torch.randn(25, generator=g, dtype=D)
    model = _TwoModules().double()
    weights = ModuleAwareWeights.from_model(model, num_aux=2, exclude=("head",)).double()
    with torch.no_grad():
        weights.raw.copy_(torch.tensor([[1.0, 0.3], [0.6, 1.7]], dtype=D))

    def task_losses(m):
        out = m(x)
        return ((out - targets) ** 2).mean(0) + 0.01 * sum((p ** 2).sum() for p in m.parameters())

    def dev_loss(m):
        return ((m(xd)[:, 0] - yd) ** 2).mean()

    names = [n for n, _ in model.named_parameters()]

    def field_at(flat, raw):
        if not flat.requires_grad:  # G is a gradient: it needs a graph from θ even when θ is fixed
            flat = flat.clone().requires_grad_()
        params = dict(zip(names, torch.split(flat, [p.numel() for p in model.parameters()])))
        params = {n: t.view_as(p) for (n, p), t in zip(model.named_parameters(), params.values())}
        losses = torch.func.functional_call(model, params, (x,))
        losses = ((losses - targets) ** 2).mean(0) + 0.01 * sum((t ** 2).sum() for t in params.values())
        tensors = tuple(params.values())
        return torch.cat([g.reshape(-1) for g in weights.field(names, tensors, losses, raw=raw, create_graph=True)])

    def solve(raw):
        """The fixed point G(θ, raw) = 0 (G is affine in θ: one Newton step from zero is exact)."""
        zero = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=D, requires_grad=True)
        jac = torch.autograd.functional.jacobian(lambda t: field_at(t, raw), zero.detach(), create_graph=True)
        return -torch.linalg.solve(jac, field_at(zero, raw))

    def set_params(flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat.detach(), model.parameters())

    return model, weights, task_losses, dev_loss, field_at, solve, set_params


def test_module_groups():
    model = _TwoModules()
    assert module_groups(model, exclude=("head",)) == {"enc1": ["enc1.weight"], "enc2": ["enc2.weight"]}
    assert list(module_groups(model, by="tensor")) == ["enc1.weight", "enc2.weight", "head.weight", "head.bias"]


def test_module_aware_hypergradient_matches_dense_transposed_solve_and_fd():
    model, weights, task_losses, dev_loss, field_at, solve, set_params = _maoal()
    raw = weights.raw.detach().clone()
    theta = solve(raw).detach()
    set_params(theta)
    jac = torch.autograd.functional.jacobian(lambda t: field_at(t, raw), theta)
    assert float((jac - jac.T).abs().max()) > 1e-3  # really non-symmetric
    d_field_d_raw = torch.autograd.functional.jacobian(lambda r: field_at(theta, r), raw).reshape(len(theta), -1)
    v = torch.autograd.grad(dev_loss(model), list(model.parameters()))
    v = torch.cat([t.reshape(-1) for t in v])
    dense = -(d_field_d_raw.T @ torch.linalg.solve(jac.T, v)).reshape(raw.shape)

    eps, fd = 1e-6, torch.zeros_like(raw)
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            values = []
            for sign in (1, -1):
                shifted = raw.clone()
                shifted[i, j] += sign * eps
                set_params(solve(shifted))
                values.append(float(dev_loss(model).detach()))
            fd[i, j] = (values[0] - values[1]) / (2 * eps)
    set_params(theta)
    assert torch.allclose(dense, fd, rtol=1e-6, atol=1e-9)

    for mode, options, rtol in [("implicit-exact", {}, 1e-9), ("implicit-gmres", {"tol": 1e-12}, 1e-9),
                                ("implicit-neumann", {"iters": 2000}, 1e-4)]:  # slow: κ(J) is large
        weights.raw.grad = None
        weights.backward(HyperGradient(mode, **options), model, task_losses, dev_loss)
        assert torch.allclose(weights.raw.grad, dense, rtol=rtol, atol=1e-12), mode
    for mode in ("implicit-cg", "implicit-nystrom"):
        with pytest.raises(ValueError, match="symmetric inner Hessian"):
            weights.backward(HyperGradient(mode), model, task_losses, dev_loss)


def test_module_aware_lower_level_writes_the_weighted_gradient():
    model, weights, task_losses, dev_loss, field_at, solve, set_params = _maoal()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    weights.write_gradients(model, task_losses(model))
    written = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(written, field_at(flat, weights.raw.detach()), rtol=1e-12)
    assert weights.raw.grad is None
