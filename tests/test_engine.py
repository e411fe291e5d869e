"""The one implicit engine: mode objects, the public stationarity hook, solver diagnostics,
and the CG / Neumann solvers' two loops (host and device) giving the same answer."""

import pytest
import torch

import bilevel
from bilevel import BilevelProblem, HyperGradient, HypergradientWarning, SolverBreakdownError
from bilevel.modes import ImplicitCG, ImplicitNeumann, Unroll
from bilevel.solvers import conjugate_gradient, neumann

from problems import ridge, symmetric_system

f64 = torch.float64


def test_a_mode_object_is_the_mode_string():
    problem = ridge()
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    by_name = HyperGradient("implicit-cg", iters=7, tol=0.0).compute(*args)
    hg = HyperGradient(ImplicitCG(iters=7, tol=0.0))
    assert torch.equal(hg.compute(*args), by_name)
    assert hg.stats.mode == "implicit-cg" and hg.stats.hvps == 7 + 1  # and the true residual
    assert torch.equal(HyperGradient(ImplicitCG, iters=7, tol=0.0).compute(*args), by_name)
    with pytest.raises(TypeError, match="go to the mode: pass them to ImplicitCG"):
        HyperGradient(ImplicitCG(), iters=3)
    assert set(bilevel.modes.__all__) >= {"ImplicitCG", "ImplicitNeumann", "Unroll", "TruncatedUnroll"}


def test_the_stationarity_hook_defines_the_inner_solution():
    """G(w, φ) = A w − φ (A non-symmetric) through the public hook: dθ*/dφ = A⁻¹, so
    d(Σθ)/dφ = A⁻ᵀ 1; modes for symmetric systems and unrolled modes refuse."""
    matrix = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=f64)
    phi = torch.tensor([1.0, 2.0], dtype=f64, requires_grad=True)
    theta = torch.linalg.solve(matrix, phi.detach()).requires_grad_()
    problem = BilevelProblem(None, lambda w, p: w.sum(), theta, phi, stationarity=lambda w, p: matrix @ w - p)
    assert not problem.symmetric and not problem.traceable
    expected = torch.linalg.solve(matrix.T, torch.ones(2, dtype=f64))
    for mode in ("implicit-exact", ImplicitNeumann(iters=200, alpha=0.25), "implicit-gmres"):
        (grad,) = HyperGradient(mode).solve(problem)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-10)
    for mode in ("implicit-cg", "unroll"):
        with pytest.raises(ValueError, match="symmetric inner Hessian.*implicit-exact"):
            HyperGradient(mode).solve(problem)
    wrong = BilevelProblem(None, lambda w, p: w.sum(), theta, phi, stationarity=lambda w, p: (w, w))
    with pytest.raises(ValueError, match="one tensor per params tensor"):
        HyperGradient("implicit-exact").solve(wrong)
    with pytest.raises(TypeError, match="stationarity: expected a callable"):
        BilevelProblem(None, lambda w, p: w.sum(), theta, phi, stationarity=3)


def test_the_hook_binds_modules_like_the_losses():
    """With a module as params, the map sees it bound to the point of evaluation: twice the
    gradient of a ridge loss has the ridge hypergradient, in every non-symmetric mode, and the
    compiled path runs it eagerly with a warning."""
    problem = ridge(p=4)
    model = torch.nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(problem.params_star().detach().reshape(1, 4))

    def inner(m, lam):
        return problem.inner_loss(m.weight.reshape(-1), lam)

    def doubled_gradient(m, lam):
        (w,) = [p for p in m.parameters()]
        return tuple(2 * g for g in torch.autograd.grad(inner(m, lam), (w,), create_graph=True))

    hook = BilevelProblem(
        None,
        lambda m, lam: problem.outer_loss(m.weight.reshape(-1), lam),
        model,
        problem.hparams,
        stationarity=doubled_gradient,
        symmetric=True,
    )
    expected = problem.exact_hypergradient()
    for mode in ("implicit-exact", "implicit-cg"):
        (grad,) = HyperGradient(mode, **({"tol": 1e-12} if mode == "implicit-cg" else {})).solve(hook)
        torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-12)
    fast = HyperGradient("implicit-neumann", iters=5, compile=True)
    with pytest.warns(HypergradientWarning, match="BilevelProblem defines its own stationarity, which"):
        for _ in range(2):
            fast.solve(hook)
    assert "compiled" not in fast.stats.extra


def test_solvers_report_their_own_breakdowns():
    """Each solver names its breakdown and explains it; HyperGradient passes that on."""
    matrix = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=f64))
    v = (torch.ones(3, dtype=f64),)
    result = conjugate_gradient(lambda x: (matrix @ x[0],), v, 10)
    assert result.breakdown == "negative_curvature" and result.negative_curvature and not result.converged
    assert "add damping" in result.message
    series = neumann(lambda x: (matrix @ x[0],), v, 30, 0.9)
    assert series.breakdown == "diverged" and "alpha" in series.message and not series.converged
    fine = neumann(lambda x: (matrix[:2, :2] @ x[0],), (torch.ones(2, dtype=f64),), 30, 0.5)
    assert fine.breakdown is None and fine.message == "" and fine.converged
    quadratic = torch.tensor([1.0, -1.0], dtype=f64)  # a saddle: f = ½ Σ q w², g = Σ w
    w = torch.zeros(2, dtype=f64, requires_grad=True)
    phi = torch.ones(2, dtype=f64, requires_grad=True)
    args = (lambda w, p: 0.5 * (quadratic * w**2).sum() - (p * w).sum(), lambda w, p: w.sum(), w, phi)
    hg = HyperGradient("implicit-cg")
    with pytest.warns(HypergradientWarning, match="implicit-cg: the conjugate-gradient solve met negative"):
        hg.compute(*args)
    assert hg.stats.breakdown == "negative_curvature" and "damping" in hg.stats.breakdown_message
    with pytest.raises(SolverBreakdownError, match="implicit-cg: the conjugate-gradient solve met negative"):
        HyperGradient("implicit-cg", strict=True).compute(*args)


@pytest.mark.parametrize("start", [False, True])
def test_one_cg_host_and_device_loops_agree(start):
    matrix, matvec, v = symmetric_system([10.0 ** (-k / 5) for k in range(12)])
    x0 = tuple(0.1 * t for t in v) if start else None
    host = conjugate_gradient(matvec, v, 8, tol=0.0, damping=0.3, x0=x0)
    device = conjugate_gradient(matvec, v, 8, tol=0.0, damping=0.3, x0=x0, sync=False)
    assert device.residual is None and set(device.info) == {"residual", "iters", "negative_curvature"}
    for a, b in zip(host.x, device.x):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    # the device loop always measures the true residual; the host loop when it meets tol
    assert host.products + 1 == device.products == 8 + 1 + int(start) and not host.converged
    # past convergence the device loop takes zero steps: the same iterate as the host's early stop
    early = conjugate_gradient(matvec, v, 200, tol=1e-8)
    masked = bilevel._src.solvers.conjugate_gradient_report(
        conjugate_gradient(matvec, v, 200, tol=1e-8, sync=False), tol=1e-8
    )
    assert masked.iters == early.iters < 200 and masked.converged and early.converged
    torch.testing.assert_close(torch.cat(masked.x), torch.cat(early.x), rtol=1e-10, atol=1e-12)


def test_one_neumann_host_and_device_loops_agree():
    _, matvec, v = symmetric_system([0.2 + k / 10 for k in range(12)])
    host = neumann(matvec, v, 15, 0.5)
    device = bilevel._src.solvers.neumann_report(neumann(matvec, v, 15, 0.5, sync=False), 0.5)
    assert (host.residual, host.converged, host.products) == (
        device.residual,
        device.converged,
        device.products,
    )
    assert all(torch.equal(a, b) for a, b in zip(host.x, device.x))


def test_unrolled_mode_objects_keep_their_optimizer_options():
    problem = ridge(p=3)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    by_name = HyperGradient("unroll", steps=4, lr=0.05).compute(*args)
    assert torch.equal(HyperGradient(Unroll.from_options(steps=4, lr=0.05)).compute(*args), by_name)


def test_a_mode_of_ones_own_that_sets_only_the_flags_still_warns_and_raises(monkeypatch):
    """Modes written for 0.1.0 set ``stats.diverged`` (or return ``SolveResult(diverged=True)``)
    without a breakdown name or message: the solver's standard message is used."""
    from dataclasses import dataclass
    from typing import ClassVar

    from bilevel.implicit import implicit_hypergradient
    from bilevel.modes import base
    from bilevel.solvers import SolveResult

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @bilevel.register_mode
    @dataclass
    class FlagsOnly(bilevel.Mode):
        name: ClassVar[str] = "test-flags-only"
        through_result: bool = False

        def hypergradient(self, problem, stats):
            if self.through_result:
                return implicit_hypergradient(
                    problem, lambda op, v: SolveResult(x=v, products=0, iters=0, diverged=True), stats
                )
            stats.diverged = True
            return tuple(torch.zeros_like(t) for t in problem.phi0)

    problem = ridge(p=3)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    for through_result in (False, True):
        with pytest.warns(HypergradientWarning, match="test-flags-only: the Neumann series diverged"):
            HyperGradient("test-flags-only", through_result=through_result).compute(*args)
        with pytest.raises(SolverBreakdownError, match="test-flags-only: the Neumann series diverged"):
            HyperGradient("test-flags-only", strict=True, through_result=through_result).compute(*args)
    result = SolveResult(x=(torch.ones(1),), products=0, iters=0, singular=True)
    assert result.breakdown == "singular" and result.singular
    named = SolveResult(x=(torch.ones(1),), products=0, iters=0, breakdown="diverged")
    assert named.diverged and not named.singular
    with pytest.raises(ValueError, match="breakdown must be None or one of"):
        SolveResult(x=(torch.ones(1),), products=0, iters=0, breakdown="exploded")


def test_containers_the_pytree_registry_does_not_know_are_read_as_plain_ones():
    """A subclass of dict or list (0.1.0 read it as the plain container; so does this)."""
    MyDict, MyList = type("MyDict", (dict,), {}), type("MyList", (list,), {})
    problem = ridge(p=3)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star())
    expected = HyperGradient("implicit-exact").compute(*args, problem.hparams)
    got = HyperGradient("implicit-exact").compute(
        lambda w, h: problem.inner_loss(w, h["a"][0]),
        lambda w, h: problem.outer_loss(w, h["a"][0]),
        args[2],
        MyDict(a=MyList([problem.hparams])),
    )
    assert type(got) is dict and type(got["a"]) is list and torch.equal(got["a"][0], expected)
