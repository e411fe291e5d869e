"""bilevel.testing: the finite-difference helpers themselves, then every implicit mode checked
with them on non-quadratic problems (logistic regression and a small MLP)."""

import math

import pytest
import torch

from bilevel import HyperGradient
from bilevel.testing import (
    assert_hypergradient_close,
    default_eps,
    finite_difference_hypergradient,
    random_direction,
)

from problems import logistic, ridge

f64 = torch.float64


def _sin_of_square(phi):
    """F(φ) = Σ sin(φ²) through θ*(φ) = φ², with dF/dφ = 2φ·cos(φ²)."""
    return (lambda h: h**2), (lambda w, h: torch.sin(w).sum()), 2 * phi * torch.cos(phi**2)


# ------------------------------------------------------------------ finite differences
def test_each_scheme_matches_the_analytic_derivative_with_its_order():
    phi = torch.tensor([0.3, -1.2, 2.0], dtype=f64)
    solve, outer, expected = _sin_of_square(phi)
    errors = {}
    for scheme, tol in (("forward", 1e-6), ("central", 1e-8), ("five-point", 1e-9)):
        fd = finite_difference_hypergradient(solve, outer, phi, scheme=scheme)
        errors[scheme] = float((fd - expected).abs().max())
        assert errors[scheme] < tol, (scheme, errors[scheme])
    assert errors["forward"] > 10 * errors["central"] > 10 * errors["five-point"]


def test_default_steps_follow_the_error_analysis():
    u = torch.finfo(f64).eps
    assert default_eps(f64, "forward") == pytest.approx(u**0.5)
    assert default_eps(f64) == pytest.approx(6.06e-6, rel=1e-2) == u ** (1 / 3)
    assert default_eps(f64, "five-point") == pytest.approx(u**0.2)
    assert default_eps(torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3))


def test_step_is_relative_to_the_size_of_the_hparams():
    # F(φ) = Σ (φ/s)³ with s = 1e5: an absolute step of 6e-6 would lose ~6 digits to rounding
    s = 1e5
    phi = torch.tensor([1.0e5, -3.0e4, 2.5e5], dtype=f64)
    fd = finite_difference_hypergradient(lambda h: h / s, lambda w, h: (w**3).sum(), phi)
    torch.testing.assert_close(fd, 3 * phi**2 / s**3, rtol=1e-9, atol=0)


def test_nested_structures_are_kept_and_match_autograd():
    hp = {
        "a": torch.tensor([0.5, -0.4], dtype=f64),
        "b": (torch.tensor(0.7, dtype=f64), torch.tensor([[0.1, 0.2], [-0.3, 0.4]], dtype=f64)),
    }

    def solve(h):  # a tuple of params, non-linear in every hparam
        scale, mat = h["b"]
        return (torch.tanh(h["a"]) * scale, mat @ h["a"])

    def outer(w, h):
        return (w[0] ** 2).sum() + torch.sin(w[1]).sum() + h["b"][0] * h["a"].sum()

    fd = finite_difference_hypergradient(solve, outer, hp)
    leaves = [
        hp["a"].clone().requires_grad_(),
        hp["b"][0].clone().requires_grad_(),
        hp["b"][1].clone().requires_grad_(),
    ]
    h = {"a": leaves[0], "b": (leaves[1], leaves[2])}
    exact = torch.autograd.grad(outer(solve(h), h), leaves)
    assert set(fd) == {"a", "b"} and isinstance(fd["b"], tuple) and len(fd["b"]) == 2
    for got, want in zip((fd["a"], fd["b"][0], fd["b"][1]), exact):
        assert got.shape == want.shape and got.dtype == f64
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_directional_derivatives():
    phi = torch.tensor([0.3, -1.2, 2.0, 0.8], dtype=f64)
    solve, outer, expected = _sin_of_square(phi)
    d = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=f64)
    value = finite_difference_hypergradient(solve, outer, phi, direction=d)
    assert value.shape == () and value.dtype == f64
    assert float(value) == pytest.approx(float(expected @ d), rel=1e-8)
    # "random" draws random_direction(hparams, seed): reproducible, unit norm, hparams' structure
    hp = {"x": phi, "y": torch.tensor([[0.1, 0.2]], dtype=f64)}
    r = random_direction(hp, 3)
    assert set(r) == {"x", "y"} and r["y"].shape == (1, 2)
    assert math.sqrt(float((r["x"] ** 2).sum() + (r["y"] ** 2).sum())) == pytest.approx(1.0)
    torch.testing.assert_close(random_direction(hp, torch.Generator().manual_seed(3)), r, rtol=0, atol=0)
    solve_d, outer_d = (lambda h: h["x"] ** 2 + h["y"].sum()), (lambda w, h: torch.sin(w).sum())
    full = finite_difference_hypergradient(solve_d, outer_d, hp)
    along = finite_difference_hypergradient(solve_d, outer_d, hp, direction="random", generator=3)
    assert float(along) == pytest.approx(
        float((full["x"] * r["x"]).sum() + (full["y"] * r["y"]).sum()), rel=1e-8
    )


def test_a_dict_direction_is_matched_to_hparams_by_key():
    hp = {"a": torch.tensor(1.0, dtype=f64), "b": torch.tensor(2.0, dtype=f64)}
    solve, outer = (lambda h: 3 * h["a"]), (lambda w, h: w + 10 * h["b"])  # dF/da = 3, dF/db = 10
    along_b = {"b": torch.tensor(1.0, dtype=f64), "a": torch.tensor(0.0, dtype=f64)}  # another key order
    assert float(finite_difference_hypergradient(solve, outer, hp, direction=along_b)) == pytest.approx(
        10.0, rel=1e-8
    )
    with pytest.raises(
        ValueError, match=r"direction: expected a dict with the keys of hparams, \['a', 'b'\], got a tuple"
    ):
        finite_difference_hypergradient(solve, outer, hp, direction=(torch.tensor(1.0, dtype=f64),) * 2)
    with pytest.raises(ValueError, match=r"got keys \['a', 'c'\]"):
        finite_difference_hypergradient(solve, outer, hp, direction={"a": hp["a"], "c": hp["b"]})


def test_inner_solve_may_use_autograd_and_hparams_are_never_touched():
    target = torch.tensor([1.0, -2.0, 0.5], dtype=f64)
    phi = torch.tensor([0.2, 0.4, -0.1], dtype=f64, requires_grad=True)
    before = phi.detach().clone()
    seen = []

    def solve(h):  # gradient descent with autograd on ½‖θ − h‖² + ½‖θ − t‖²: θ* = (h + t)/2
        seen.append(h.requires_grad)
        theta = torch.zeros(3, dtype=f64, requires_grad=True)
        for _ in range(60):
            with torch.enable_grad():
                loss = 0.5 * ((theta - h) ** 2).sum() + 0.5 * ((theta - target) ** 2).sum()
                (grad,) = torch.autograd.grad(loss, theta)
            theta = (theta - 0.3 * grad).detach().requires_grad_()
        return theta

    fd = finite_difference_hypergradient(solve, lambda w, h: (w**2).sum() + (w * h).sum(), phi)
    # F(h) = ¼‖h + t‖² + ½ h·(h + t), so dF/dh = 1.5 h + t
    torch.testing.assert_close(fd, 1.5 * phi.detach() + target, rtol=1e-8, atol=1e-10)
    assert not any(seen)
    assert torch.equal(phi.detach(), before) and phi.requires_grad and phi.grad is None


def test_float32_warns_that_fd_is_noisy():
    phi = torch.tensor([0.5, 1.5])
    with pytest.warns(UserWarning, match="float32 are noisy") as record:
        fd = finite_difference_hypergradient(lambda h: h, lambda w, h: (w**2).sum(), phi)
    assert record[0].filename == __file__  # the warning points at the caller
    assert fd.dtype == torch.float32
    torch.testing.assert_close(fd, 2 * phi, rtol=1e-3, atol=1e-3)


def test_bad_arguments_raise_readable_errors():
    phi = torch.tensor([0.5], dtype=f64)
    solve, outer = (lambda h: h), (lambda w, h: (w**2).sum())
    with pytest.raises(ValueError, match="scheme must be one of"):
        finite_difference_hypergradient(solve, outer, phi, scheme="backward")
    with pytest.raises(ValueError, match="eps must be a positive number"):
        finite_difference_hypergradient(solve, outer, phi, eps=0.0)
    with pytest.raises(ValueError, match="eps=1e-20 is below the resolution"):
        finite_difference_hypergradient(solve, outer, phi, eps=1e-20)
    with pytest.raises(TypeError, match="hparams: finite differences need tensors"):
        finite_difference_hypergradient(solve, outer, torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="outer_loss must return a scalar"):
        finite_difference_hypergradient(solve, lambda w, h: w * 2, torch.ones(2, dtype=f64))
    with pytest.raises(ValueError, match="is nan at a perturbed hparams"):
        finite_difference_hypergradient(solve, lambda w, h: torch.log(w - 0.5).sum(), phi)
    with pytest.raises(ValueError, match="direction: expected tensors of shapes"):
        finite_difference_hypergradient(solve, outer, phi, direction=torch.ones(2, dtype=f64))
    with pytest.raises(ValueError, match="direction is zero"):
        finite_difference_hypergradient(solve, outer, phi, direction=torch.zeros(1, dtype=f64))
    with pytest.raises(ValueError, match="direction must be None, 'random'"):
        finite_difference_hypergradient(solve, outer, phi, direction="randn")
    with pytest.raises(TypeError, match="hg_or_mode: expected a HyperGradient"):
        assert_hypergradient_close(object(), outer, outer, solve, phi)


# ------------------------------------------------------------ assert_hypergradient_close
def _dict_problem():
    """θ*(φ) = tanh(φ)/d with φ = (a, b) a dict (a: 3 entries, b: 2×2), for precise reports."""
    d = torch.linspace(1.0, 2.0, 7, dtype=f64)
    target = torch.linspace(-1.0, 1.0, 7, dtype=f64)

    def vec(h):
        return torch.cat([h["a"], h["b"].reshape(-1)])

    def inner_loss(w, h):
        return 0.5 * (d * w**2).sum() - (w * torch.tanh(vec(h))).sum()

    def outer_loss(w, h):
        return 0.5 * ((w - target) ** 2).sum()

    hp = {
        "a": torch.tensor([0.1, -0.5, 0.9], dtype=f64),
        "b": torch.tensor([[0.3, -0.2], [0.6, 1.1]], dtype=f64),
    }
    return inner_loss, outer_loss, lambda h: torch.tanh(vec(h)) / d, hp


def test_assert_passes_for_a_correct_mode_and_leaves_hparams_alone():
    problem = ridge(p=5)
    before = problem.hparams.detach().clone()
    computed, fd = assert_hypergradient_close(
        "implicit-exact",
        problem.inner_loss,
        problem.outer_loss,
        problem.inner_solve,
        problem.hparams,
        rtol=1e-8,
        atol=0,
    )
    torch.testing.assert_close(computed, problem.exact_hypergradient(), rtol=1e-10, atol=0)
    torch.testing.assert_close(fd, problem.exact_hypergradient(), rtol=1e-8, atol=0)
    assert torch.equal(problem.hparams.detach(), before) and problem.hparams.grad is None
    # hparams that do not require grad are fine too (the helper differentiates copies)
    assert_hypergradient_close(
        "implicit-exact",
        problem.inner_loss,
        problem.outer_loss,
        problem.inner_solve,
        problem.hparams.detach(),
    )


def test_report_of_a_wrong_mode():
    problem = ridge(p=5)
    wrong = HyperGradient("implicit-identity", alpha=0.01)
    with pytest.raises(AssertionError) as info:
        assert_hypergradient_close(
            wrong, problem.inner_loss, problem.outer_loss, problem.inner_solve, problem.hparams
        )
    report = str(info.value)
    for piece in (
        "mode 'implicit-identity'",
        "relative error",
        "rtol 1e-05",
        "cosine similarity",
        "‖fd‖",
        "worst entries:",
        "hparams[",
        "central, relative step eps=6.06e-06",
        "mode stats: hvps=1",
        "‖∇θ inner_loss‖ at inner_solve(hparams): ",
    ):
        assert piece in report, piece
    assert problem.hparams.grad is None


class _OneEntryOff(HyperGradient):
    """A correct mode with one entry of the result moved by 1e-3."""

    def compute(self, *args):
        out = super().compute(*args)
        out["b"] = out["b"].clone()
        out["b"][1, 0] += 1e-3
        return out


def test_report_names_the_worst_entry_by_key_and_index():
    inner_loss, outer_loss, inner_solve, hp = _dict_problem()
    computed, _ = assert_hypergradient_close(
        "implicit-exact", inner_loss, outer_loss, inner_solve, hp, rtol=1e-8, atol=0
    )
    assert set(computed) == {"a", "b"} and computed["b"].shape == (2, 2)
    with pytest.raises(AssertionError) as info:
        assert_hypergradient_close(_OneEntryOff("implicit-exact"), inner_loss, outer_loss, inner_solve, hp)
    rows = str(info.value).split("worst entries:\n")[1].splitlines()
    names = [row.split("  computed")[0].strip() for row in rows[:5]]
    assert names[0] == "hparams['b'][1, 0]" and "diff  1.00e-03" in rows[0]
    assert set(names[1:]) <= {
        "hparams['a'][0]",
        "hparams['a'][1]",
        "hparams['a'][2]",
        "hparams['b'][0, 0]",
        "hparams['b'][0, 1]",
        "hparams['b'][1, 1]",
    }


def test_assert_along_a_direction():
    inner_loss, outer_loss, inner_solve, hp = _dict_problem()
    computed, fd = assert_hypergradient_close(
        "implicit-cg", inner_loss, outer_loss, inner_solve, hp, direction="random", generator=1
    )
    d = random_direction(hp, 1)
    assert fd.shape == () and float(fd) == pytest.approx(
        float((computed["a"] * d["a"]).sum() + (computed["b"] * d["b"]).sum()), rel=1e-6
    )
    with pytest.raises(AssertionError, match="along the given direction: computed"):
        assert_hypergradient_close(
            _OneEntryOff("implicit-exact"),
            inner_loss,
            outer_loss,
            inner_solve,
            hp,
            direction={"a": torch.zeros(3, dtype=f64), "b": torch.eye(2, dtype=f64).flip(0)},
        )


def test_float32_uses_looser_default_tolerances_and_warns():
    problem = ridge(p=4, dtype=torch.float32)
    with pytest.warns(UserWarning, match="noisy"):
        computed, fd = assert_hypergradient_close(
            "implicit-exact", problem.inner_loss, problem.outer_loss, problem.inner_solve, problem.hparams
        )
    assert computed.dtype == fd.dtype == torch.float32


# ------------------------------------------------- implicit modes against finite differences
# (mode, options, rtol against five-point differences, which are accurate to ~1e-12 here).
# Nyström at rank P solves (H + ρI)x = v: bias ~ρ/λmin, and its complement term
# (I − QQᵀ)v/ρ adds rounding ~u/ρ (2e-4 at ρ = 1e-12), so ρ = 1e-8 and a looser tolerance.
IMPLICIT_MODES = [
    ("implicit-exact", {}, 1e-9),
    ("implicit-cg", {"iters": 100, "tol": 1e-12}, 1e-9),
    ("implicit-gmres", {"iters": 100, "tol": 1e-12}, 1e-9),
    ("implicit-nystrom", {"rank": 10_000, "rho": 1e-8}, 1e-6),  # rank capped at P
    ("implicit-neumann", {"iters": 2000}, 1e-9),
]


@pytest.mark.parametrize("mode, options, rtol", IMPLICIT_MODES)
def test_implicit_modes_against_fd_on_logistic_regression(mode, options, rtol):
    problem = logistic()
    hg = HyperGradient(mode, **options)
    assert_hypergradient_close(
        hg,
        problem.inner_loss,
        problem.outer_loss,
        problem.inner_solve,
        problem.hparams,
        rtol=rtol,
        atol=0,
        scheme="five-point",
    )
    if mode != "implicit-exact":
        assert hg.stats.converged is not False


def hessian(loss, flat):
    """The dense Hessian by reverse-over-reverse (forward AD would load TorchScript decompositions)."""
    return torch.func.jacrev(torch.func.grad(loss))(flat)


class TinyMLP:
    """Regression with a 3-4-1 tanh MLP (P = 21 params, a dict) and hparams
    {"log_decay": per-tensor log weight decay (4), "log_scale": per-input log scale (3)}:
    non-convex in θ, non-linear in φ, and φ also enters the features (a mixed term that is
    not just a weight decay).

    ``inner_solve`` runs Newton's method to machine precision from the minimiser at the base
    hparams (found once by L-BFGS then Newton), and memoises its answers by the value of the
    hparams, so every mode's finite differences reuse the same solves.
    """

    shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 1), "b2": (1,)}

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, 3, generator=g, dtype=f64)
        self.y = torch.sin(2 * self.x[:, :1]) + 0.1 * torch.randn(40, 1, generator=g, dtype=f64)
        self.xv = torch.randn(30, 3, generator=g, dtype=f64)
        self.yv = torch.sin(2 * self.xv[:, :1])
        self.sizes = [math.prod(s) for s in self.shapes.values()]
        self.hparams = {
            "log_decay": torch.tensor([-2.0, -2.5, -2.0, -2.5], dtype=f64, requires_grad=True),
            "log_scale": torch.tensor([0.1, -0.2, 0.0], dtype=f64, requires_grad=True),
        }
        self._memo = {}
        start = 0.5 * torch.randn(sum(self.sizes), generator=g, dtype=f64)
        self.start = self._newton(self._lbfgs(start, self.hparams), self.hparams, steps=6)

    def unpack(self, flat):
        return {k: t.reshape(s) for (k, s), t in zip(self.shapes.items(), flat.split(self.sizes))}

    def predict(self, p, inputs, h):
        return torch.tanh((inputs * h["log_scale"].exp()) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def inner_loss(self, p, h):
        decay = sum(d.exp() * (p[k] ** 2).sum() for d, k in zip(h["log_decay"], self.shapes))
        return ((self.predict(p, self.x, h) - self.y) ** 2).mean() + 0.5 * decay

    def outer_loss(self, p, h):
        return ((self.predict(p, self.xv, h) - self.yv) ** 2).mean()

    def _flat_loss(self, h):
        h = {k: v.detach() for k, v in h.items()}
        return lambda flat: self.inner_loss(self.unpack(flat), h)

    def _lbfgs(self, flat, h):
        flat = flat.clone().requires_grad_()
        opt = torch.optim.LBFGS([flat], max_iter=300, tolerance_grad=1e-9, line_search_fn="strong_wolfe")
        loss = self._flat_loss(h)

        def closure():
            opt.zero_grad()
            value = loss(flat)
            value.backward()
            return value

        with torch.enable_grad():
            opt.step(closure)
        return flat.detach()

    def _newton(self, flat, h, steps):
        loss = self._flat_loss(h)
        for _ in range(steps):
            flat = flat - torch.linalg.solve(hessian(loss, flat), torch.func.grad(loss)(flat))
        return flat

    def inner_solve(self, h):
        key = tuple(torch.cat([h["log_decay"], h["log_scale"]]).tolist())
        if key not in self._memo:  # FD steps are ≤ 2e-3: 4 quadratic steps reach machine precision
            self._memo[key] = self._newton(self.start, h, steps=4)
        return self.unpack(self._memo[key])


@pytest.fixture(scope="module")
def mlp():
    return TinyMLP()


def test_mlp_is_solved_to_a_strict_minimum(mlp):
    loss = mlp._flat_loss(mlp.hparams)
    assert float(torch.func.grad(loss)(mlp.start).norm()) < 1e-13
    eigenvalues = torch.linalg.eigvalsh(hessian(loss, mlp.start))
    assert float(eigenvalues.min()) > 0.01 and float(eigenvalues.max() / eigenvalues.min()) < 200


@pytest.mark.parametrize("mode, options, rtol", IMPLICIT_MODES)
def test_implicit_modes_against_fd_on_a_small_mlp(mlp, mode, options, rtol):
    hg = HyperGradient(mode, **options)
    computed, _ = assert_hypergradient_close(
        hg,
        mlp.inner_loss,
        mlp.outer_loss,
        mlp.inner_solve,
        mlp.hparams,
        rtol=rtol,
        atol=0,
        scheme="five-point",
    )
    assert set(computed) == {"log_decay", "log_scale"} and computed["log_scale"].shape == (3,)
    assert all(t.grad is None for t in mlp.hparams.values())


def test_an_inner_solve_that_returns_a_module():
    """Issue 21: inner_solve may return the module (its parameters set to θ*(φ)), as the
    closures that call it expect; the check passes for an exact mode and fails for a wrong one."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 1, dtype=torch.float64)
    net = torch.nn.Linear(3, 1, bias=False).double()
    lam = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)

    def inner(model, log_decay):
        return ((model(x) - y) ** 2).mean() + log_decay.exp() * (model.weight**2).sum()

    def outer(model, log_decay):
        return ((model(x) - y + 0.3) ** 2).mean()

    def solve(log_decay):
        a = 2 * x.T @ x / 20 + 2 * log_decay.exp() * torch.eye(3, dtype=torch.float64)
        with torch.no_grad():
            net.weight.copy_(torch.linalg.solve(a, 2 * x.T @ y / 20).T)
        return net

    assert_hypergradient_close("implicit-exact", inner, outer, solve, lam)
    with pytest.raises(AssertionError):
        assert_hypergradient_close("implicit-identity", inner, outer, solve, lam)
