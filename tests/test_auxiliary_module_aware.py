"""Module-aware auxiliary weighting (MAOAL): the non-symmetric implicit system, checked densely and
against a finite difference of the fixed point; modes for symmetric systems must refuse."""

import pytest
import torch
from torch import nn

import bilevel
from bilevel import HyperGradient
from bilevel.auxiliary import ModuleAwareWeights, module_groups
from bilevel.modes import get_mode

D = torch.float64
REG = 0.3  # ridge on every task loss: keeps J well conditioned (eigenvalues 1.1 to 6.7), so
# Neumann with α = 1/λmax converges at rate 0.84 per product


class _TwoModules(nn.Module):
    """Predictions (one column per task) = (enc1(x) + enc2(sin x)) · MIX + ½ head(x): every task
    uses every encoder parameter (MIX is a fixed dense mixing), so the tasks are coupled. Linear
    in the parameters: with squared losses G(θ, φ) is affine in θ, and Newton finds its fixed
    point in one step."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Linear(3, 3, bias=False)
        self.enc2 = nn.Linear(3, 3, bias=False)
        self.head = nn.Linear(3, 3)
        self.register_buffer("mix", torch.tensor([[1.0, 0.5, -0.3], [0.2, 1.0, 0.6], [-0.4, 0.3, 1.0]]))

    def forward(self, x):
        return (self.enc1(x) + self.enc2(torch.sin(x))) @ self.mix + 0.5 * self.head(x)


class _Setup:
    """Three tasks (main, aux1, aux2) regressing one output each; weights per (aux, encoder)."""

    def __init__(self):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, 3, generator=g, dtype=D)
        self.targets = torch.randn(40, 3, generator=g, dtype=D)  # column t: task t
        self.xd = torch.randn(25, 3, generator=g, dtype=D)
        self.yd = torch.randn(25, generator=g, dtype=D)
        self.model = _TwoModules().double()
        self.weights = ModuleAwareWeights.from_model(self.model, num_aux=2, exclude=("head",)).double()
        with torch.no_grad():
            self.weights.raw.copy_(torch.tensor([[1.0, 0.3], [0.6, 1.7]], dtype=D))
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]

    def task_losses(self, model):
        out = model(self.x)
        return ((out - self.targets) ** 2).mean(0) + REG * sum((p**2).sum() for p in model.parameters())

    def dev_loss(self, model):
        return ((model(self.xd)[:, 0] - self.yd) ** 2).mean()

    def unflatten(self, flat):
        pieces = torch.split(flat, [s.numel() for s in self.shapes])
        return {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes)}

    def field(self, flat, raw):
        """G(θ, raw) as a vector, written independently of ModuleAwareProblem: per-task gradients
        of the functional model, combined with w[a, m] = ½ relu(raw[a, m]) on the encoders and 1
        on the head."""
        flat = flat if flat.requires_grad else flat.clone().requires_grad_()
        params = self.unflatten(flat)
        losses = self._losses(params)
        per_task = [torch.autograd.grad(loss, flat, create_graph=True)[0] for loss in losses]
        w = 0.5 * torch.relu(raw)
        sizes = [s.numel() for s in self.shapes]
        module_of = torch.repeat_interleave(torch.tensor([0, 1, -1, -1]), torch.tensor(sizes))
        coef = [
            torch.where(
                module_of == 0, w[a, 0], torch.where(module_of == 1, w[a, 1], torch.ones((), dtype=D))
            )
            for a in range(2)
        ]
        return per_task[0] + coef[0] * per_task[1] + coef[1] * per_task[2]

    def _losses(self, params):
        out = torch.func.functional_call(self.model, params, (self.x,))
        return ((out - self.targets) ** 2).mean(0) + REG * sum((p**2).sum() for p in params.values())

    def fixed_point(self, raw):
        """θ*(raw) with G(θ*, raw) = 0: Newton from zero. G is affine in θ, so J = ∂G/∂θ does not
        depend on θ and one step is exact; a second step with the same J polishes the rounding."""
        theta = torch.zeros(sum(s.numel() for s in self.shapes), dtype=D)
        jac = torch.autograd.functional.jacobian(lambda t: self.field(t, raw), theta, vectorize=True)
        for _ in range(2):
            theta = theta - torch.linalg.solve(jac, self.field(theta, raw).detach())
        return theta

    def set_params(self, flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, self.model.parameters())


@pytest.fixture(scope="module")
def setup():
    s = _Setup()
    raw = s.weights.raw.detach().clone()
    theta = s.fixed_point(raw)
    s.set_params(theta)
    assert float(s.field(theta, raw).detach().abs().max()) < 1e-13
    jac = torch.autograd.functional.jacobian(lambda t: s.field(t, raw), theta, vectorize=True)  # J = ∂G/∂θ
    assert float((jac - jac.T).abs().max()) > 0.1  # really non-symmetric
    d_raw = torch.autograd.functional.jacobian(lambda r: s.field(theta, r), raw, vectorize=True).reshape(
        len(theta), -1
    )
    v = torch.autograd.grad(s.dev_loss(s.model), list(s.model.parameters()))
    v = torch.cat([t.reshape(-1) for t in v])
    s.dense = -(d_raw.T @ torch.linalg.solve(jac.T, v)).reshape(raw.shape)  # transposed system
    s.untransposed = -(d_raw.T @ torch.linalg.solve(jac, v)).reshape(raw.shape)  # the classic mistake
    s.identity = lambda alpha: -(d_raw.T @ (alpha * v)).reshape(raw.shape)
    s.lambda_max = float(torch.linalg.eigvals(jac).abs().max())
    return s


def test_dense_transposed_solve_matches_a_finite_difference_of_the_fixed_point(setup):
    raw = setup.weights.raw.detach()
    eps, fd = 1e-5, torch.zeros_like(raw)
    model = _TwoModules().double()
    for index in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        values = []
        for sign in (1, -1):
            shifted = raw.clone()
            shifted[index] += sign * eps
            torch.nn.utils.vector_to_parameters(setup.fixed_point(shifted), model.parameters())
            values.append(setup.dev_loss(model).detach())
        fd[index] = (values[0] - values[1]) / (2 * eps)
    assert torch.allclose(setup.dense, fd, rtol=1e-7, atol=1e-11)
    assert float(setup.dense.abs().min()) > 5e-5  # every entry is tested, none is trivially zero
    assert not torch.allclose(setup.untransposed, fd, rtol=0.1)  # J instead of Jᵀ would fail


@pytest.mark.parametrize("mode", bilevel.available_modes())
def test_every_mode_matches_the_dense_solve_or_refuses(setup, mode):
    options = {
        "implicit-exact": {},
        "implicit-gmres": {"tol": 1e-13},
        "implicit-neumann": {"iters": 200, "alpha": 1 / setup.lambda_max},
        "implicit-identity": {"alpha": 0.2},
    }
    if not get_mode(mode).supports_nonsymmetric:
        with pytest.raises(ValueError, match="(symmetric inner Hessian|no iteration to unroll).*implicit-"):
            setup.weights.backward(HyperGradient(mode), setup.model, setup.task_losses, setup.dev_loss)
        assert setup.weights.raw.grad is None
        return
    hypergradient = HyperGradient(mode, **options.get(mode, {}))
    setup.weights.raw.grad = None
    setup.weights.backward(hypergradient, setup.model, setup.task_losses, setup.dev_loss)
    got, setup.weights.raw.grad = setup.weights.raw.grad, None
    expected = setup.identity(0.2) if mode == "implicit-identity" else setup.dense
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-13), (mode, got, expected)


def test_known_modes_split_as_documented():
    capable = {m for m in bilevel.available_modes() if get_mode(m).supports_nonsymmetric}
    assert {"implicit-exact", "implicit-gmres", "implicit-neumann", "implicit-identity"} <= capable
    assert not {"implicit-cg", "implicit-nystrom", "unroll", "truncated-unroll"} & capable


def test_lower_level_writes_the_module_weighted_gradient(setup):
    model = _TwoModules().double()
    flat = torch.randn(sum(s.numel() for s in setup.shapes), dtype=D)
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    setup.weights.write_gradients(model, setup.task_losses(model))
    written = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(written, setup.field(flat, setup.weights.raw.detach()), rtol=1e-12)
    assert setup.weights.raw.grad is None and not any(p.grad.requires_grad for p in model.parameters())


def test_module_groups_and_weights():
    model = _TwoModules()
    assert module_groups(model, exclude=("head",)) == {"enc1": ["enc1.weight"], "enc2": ["enc2.weight"]}
    assert list(module_groups(model, by="tensor")) == [
        "enc1.weight",
        "enc2.weight",
        "head.weight",
        "head.bias",
    ]
    weights = ModuleAwareWeights(3, {"a": ["enc1.weight"], "b": ["enc2.weight", "head.bias"]})
    assert weights.raw.shape == (3, 2) and torch.allclose(weights.weights(), torch.full((3, 2), 1 / 3))
    with torch.no_grad():
        weights.raw[0, 0] = -2.0
    assert weights.weights()[0, 0] == 0  # never negative
    with pytest.raises(ValueError, match="by must be"):
        module_groups(model, by="layer")
    with pytest.raises(ValueError, match="no shared parameters"):
        module_groups(model, exclude=("enc", "head"))
    with pytest.raises(ValueError, match="'enc1.weight' is in two modules, 'a' and 'b'"):
        ModuleAwareWeights(2, {"a": ["enc1.weight"], "b": ["enc2.weight", "enc1.weight"]})
    with pytest.raises(ValueError, match=r"groups\['a'\] must be a non-empty list"):
        ModuleAwareWeights(2, {"a": "enc1.weight"})
    wrong = ModuleAwareWeights(2, {"x": ["encoder.weight"]})
    with pytest.raises(ValueError, match="encoder.weight"):
        wrong.write_gradients(model, torch.stack([p.sum() for p in list(model.parameters())[:3]]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ModuleAwareWeights.from_model(model, 2).write_gradients(model, torch.ones(2, requires_grad=True))


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_gmres_solves_nonsymmetric_systems_at_any_scale(scale):
    from bilevel.solvers import gmres

    g = torch.Generator().manual_seed(1)
    n = 12
    a = scale * (3 * torch.eye(n, dtype=D) + torch.randn(n, n, generator=g, dtype=D) / n**0.5)
    assert float((a - a.T).abs().max()) > 0.1 * scale
    v = tuple(torch.split(torch.randn(n, generator=g, dtype=D), [5, 7]))  # a tuple of two tensors
    result = gmres(lambda x: tuple(torch.split(a @ torch.cat(x), [5, 7])), v, iters=n + 3, tol=1e-14)
    expected = torch.linalg.solve(a, torch.cat(v))
    assert torch.allclose(torch.cat(result.x), expected, rtol=1e-10, atol=1e-12 / scale)
    assert (
        result.converged and result.products == n + 1
    )  # R^n is the Krylov space then; one more measures the residual


def test_an_op_without_double_backward_is_named():
    model = nn.Sequential(nn.Linear(3, 2))
    weights = ModuleAwareWeights.from_model(model, num_aux=1, by="tensor")
    points = torch.randn(1, 4, 3)

    def task_losses(m):
        distances = torch.cdist(points, m[0].weight[None]).sum()
        return torch.stack(
            [distances + (m[0].bias ** 2).sum(), (m[0].weight ** 2).sum() + m[0].bias.sum() ** 2]
        )

    with pytest.raises(bilevel.NoDoubleBackwardError, match="_cdist_backward"):
        weights.backward(HyperGradient("implicit-gmres"), model, task_losses, lambda m: m[0].weight.sum())
    assert weights.raw.grad is None


@pytest.mark.parametrize(
    "groups",
    [
        {"a": ["enc1.weight", "head.bias"], "b": ["enc2.weight"]},  # groups by name, one spanning two layers
        "tensor",  # one module per parameter tensor
    ],
)
def test_lower_level_follows_the_groups(groups):
    """G_p = ∇_p L_main + Σ_a w[a, m(p)] ∇_p L_a for a parameter p of module m(p); parameters in
    no group get ∇_p (L_main + Σ_a L_a). Checked against per-task gradients, entry by entry."""
    model = _TwoModules().double()
    groups = module_groups(model, by="tensor") if groups == "tensor" else groups
    weights = ModuleAwareWeights(2, groups).double()
    with torch.no_grad():
        weights.raw.copy_(torch.linspace(-0.5, 2.0, weights.raw.numel(), dtype=D).view(weights.raw.shape))
    g = torch.Generator().manual_seed(4)
    x, targets = torch.randn(10, 3, generator=g, dtype=D), torch.randn(10, 3, generator=g, dtype=D)
    losses = lambda: ((model(x) - targets) ** 2).mean(0)
    params = dict(model.named_parameters())
    per_task = [torch.autograd.grad(loss, list(params.values()), retain_graph=True) for loss in losses()]
    w = weights.weights().detach()
    module = {name: j for j, members in enumerate(groups.values()) for name in members}
    weights.write_gradients(model, losses())
    for i, (name, p) in enumerate(params.items()):
        coef = [w[a, module[name]] if name in module else 1.0 for a in range(2)]
        expected = per_task[0][i] + coef[0] * per_task[1][i] + coef[1] * per_task[2][i]
        assert torch.allclose(p.grad, expected, rtol=1e-12, atol=1e-15), name
    assert float(w.min()) == 0.0 and len(set(w.flatten().tolist())) > 2  # a clipped weight, and distinct ones
