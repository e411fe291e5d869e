"""Bad input gets a clear error naming the argument at fault and the fix; nothing is half-written."""

import warnings

import pytest
import torch
from torch import nn

import bilevel
import bilevel._src.graph
from bilevel import HyperGradient, HypergradientWarning, NoDoubleBackwardError, NonFiniteError
from bilevel._src.problem import BilevelProblem

from problems import _Square, ridge, shrinkage


@pytest.fixture
def rp():
    return ridge(p=4)


def call(problem, mode="implicit-cg", inner=None, outer=None, params=None, hparams=None, **options):
    return HyperGradient(mode, **options).compute(
        inner or problem.inner_loss,
        outer or problem.outer_loss,
        problem.params_star() if params is None else params,
        problem.hparams if hparams is None else hparams,
    )


def test_unknown_mode_lists_the_available_ones():
    with pytest.raises(ValueError, match="available modes: .*implicit-cg"):
        HyperGradient("implicit-magic")


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="unknown option.*iterations.*iters, tol, damping"):
        HyperGradient("implicit-cg", iterations=5)


@pytest.mark.parametrize(
    "mode, options, error",
    [
        ("implicit-cg", {"iters": 0}, ValueError),
        ("implicit-cg", {"iters": 2.5}, TypeError),
        ("implicit-cg", {"tol": -1.0}, ValueError),
        ("implicit-cg", {"warm_start": "yes"}, TypeError),
        ("implicit-neumann", {"residual": "false"}, TypeError),
        ("unroll", {"update_params": "no"}, TypeError),
        ("unroll", {"measure_memory": 1}, TypeError),
        ("truncated-unroll", {"inner_batches": 5}, TypeError),
    ],
)
def test_bad_option_values(mode, options, error):
    with pytest.raises(error, match="option"):
        HyperGradient(mode, **options)


def test_every_mode_builds_with_defaults():
    for mode in bilevel.available_modes():
        assert HyperGradient(mode).mode.name == mode


def test_non_scalar_losses(rp):
    with pytest.raises(ValueError, match="inner_loss must return a scalar.*shape \\(40,\\)"):
        call(rp, inner=lambda w, lam: rp.inner_loss(w, lam) + 0 * torch.ones(40))
    with pytest.raises(ValueError, match="outer_loss must return a scalar"):
        call(rp, outer=lambda w, lam: w * 2)


def test_loss_that_is_not_a_tensor(rp):
    with pytest.raises(TypeError, match="outer_loss must return a scalar tensor, got float"):
        call(rp, outer=lambda w, lam: 1.0)
    with pytest.raises(TypeError, match="inner_loss: expected a callable"):
        HyperGradient().compute(3, rp.outer_loss, rp.params_star(), rp.hparams)


def test_loss_without_graph(rp):
    constant = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="outer_loss returned a tensor without a graph"):
        call(rp, outer=lambda w, lam: constant)


def test_hparams_and_params_must_require_grad(rp):
    with pytest.raises(ValueError, match="hparams does not require grad.*requires_grad_"):
        call(rp, hparams=rp.hparams.detach())
    with pytest.raises(ValueError, match="params does not require grad"):
        call(rp, params=rp.params_star().detach())


def test_dtype_and_device_mismatch(rp):
    with pytest.raises(ValueError, match="params has dtype torch.float32 .*one floating dtype"):
        call(rp, params=rp.params_star().float().detach().requires_grad_())
    meta = torch.zeros(4, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="params is on meta .*one device"):
        call(rp, params=meta)


def test_integer_tensors_are_refused(rp):
    with pytest.raises(TypeError, match="hparams\\[1\\]: expected a floating-point tensor"):
        call(rp, hparams=(rp.hparams, torch.tensor([1, 2])))


def test_generator_params_are_refused_with_a_fix(rp):
    with pytest.raises(TypeError, match="iterator/generator.*list\\(model.parameters\\(\\)\\)"):
        call(rp, params=(t for t in [rp.params_star()]))


def test_param_not_affecting_inner_loss(rp):
    spare = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="params\\[1\\] \\(shape \\(2,\\)\\) does not affect inner_loss"):
        call(
            rp,
            inner=lambda ps, lam: rp.inner_loss(ps[0], lam),
            outer=lambda ps, lam: rp.outer_loss(ps[0], lam),
            params=(rp.params_star(), spare),
        )


def test_outer_loss_depending_on_nothing_given(rp):
    stray = torch.ones(1, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="outer_loss depends on neither params nor hparams"):
        call(rp, outer=lambda w, lam: (stray**2).sum())


def test_op_without_double_backward_is_named(rp):
    points = torch.randn(1, 5, 4, dtype=torch.float64)

    def inner(w, lam):
        return rp.inner_loss(w, lam) + torch.cdist(points, w.view(1, 1, 4)).sum()

    with pytest.raises(NoDoubleBackwardError, match="_cdist_backward.*twice-differentiable"):
        call(rp, inner=inner)


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")  # the @once_differentiable one
@pytest.mark.parametrize("mode", ["implicit-cg", "implicit-neumann"])
def test_once_differentiable_function_is_named(rp, mode):
    """The custom Functions in the graph are looked for only when an error names them: once
    the solve finds the zero Hessian block, and when the gradient has no graph."""
    inner = lambda w, lam: _Square.apply(w).sum() + (lam.exp() * w).sum()
    with pytest.raises(ValueError, match="does not depend on params.*_SquareBackward"):
        call(rp, mode, inner=inner)
    with pytest.raises(ValueError, match="no graph.*_SquareBackward"):
        call(rp, mode, inner=lambda w, lam: _Square.apply(w).sum())


class _Cube(torch.autograd.Function):
    """x³ with a differentiable backward: double backward through it is exact."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


def test_once_differentiable_in_the_inner_loss_warns_once_per_closure():
    """f = ½ Σ Square(w) + ½‖w − φ‖²: the incoming gradient of Square's backward is a
    constant, so PyTorch does not raise and the Hessian silently loses Square's term (every
    mode returns −0.7 instead of −0.35 here). The walk finds it; a custom Function with a
    differentiable backward does not warn; one closure warns once."""
    phi = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    w = (phi.detach() / 2).requires_grad_()
    outer = lambda w, p: 0.5 * ((w - 1) ** 2).sum()
    silent = lambda w, p: 0.5 * _Square.apply(w).sum() + 0.5 * ((w - p) ** 2).sum()
    for mode in ("implicit-cg", "unroll"):
        bilevel._src.graph._SCREENED.clear()
        with pytest.warns(
            HypergradientWarning, match="holds _Square.*@once_differentiable.*wrong hypergradient"
        ):
            HyperGradient(mode).compute(silent, outer, w, phi)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same closure is screened once
            HyperGradient(mode).compute(silent, outer, w, phi)
    exact = lambda w, p: 0.25 * _Cube.apply(w).sum() + 0.5 * ((w - p) ** 2).sum()
    with warnings.catch_warnings():  # (w is not its minimiser: that warning may come)
        warnings.filterwarnings("error", message=".*once_differentiable")
        HyperGradient("implicit-cg").compute(exact, outer, w, phi)


def test_once_differentiable_warning_screens_each_partial_by_its_function():
    """functools.partial closures are screened by the function they wrap, so a harmless
    partial screened first does not hide a later one that holds the Function."""
    import functools

    phi = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    w = (phi.detach() / 2).requires_grad_()
    outer = lambda w, p: 0.5 * ((w - 1) ** 2).sum()

    def plain(w, p, scale):
        return scale * (w**2).sum() + 0.5 * ((w - p) ** 2).sum()

    def silent(w, p, scale):
        return scale * _Square.apply(w).sum() + 0.5 * ((w - p) ** 2).sum()

    bilevel._src.graph._SCREENED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HyperGradient("implicit-cg").compute(functools.partial(plain, scale=0.5), outer, w, phi)
    with pytest.warns(HypergradientWarning, match="holds _Square"):
        HyperGradient("implicit-cg").compute(functools.partial(silent, scale=0.5), outer, w, phi)


@pytest.mark.parametrize("mode", ["implicit-cg", "unroll"])
def test_a_tensor_passed_twice_is_refused(rp, mode):
    """Each entry would get its own copy and the tie would be lost (a silent 0 here)."""
    w = rp.params_star()
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] are the same tensor.*nn.ModuleList"):
        call(
            rp,
            mode,
            inner=lambda p, lam: rp.inner_loss(p[0], lam),
            outer=lambda p, lam: rp.outer_loss(p[1], lam),
            params=(w, w),
        )
    lam = rp.hparams
    with pytest.raises(ValueError, match=r"hparams\[0\] and hparams\[1\] are the same tensor"):
        call(
            rp,
            mode,
            inner=lambda p, h: rp.inner_loss(p, h[0]),
            outer=lambda p, h: rp.outer_loss(p, h[1]),
            hparams=(lam, lam),
        )
    # two modules sharing a weight, passed as a tuple: the same advice
    enc, dec = nn.Linear(3, 3, bias=False).double(), nn.Linear(3, 3, bias=False).double()
    dec.weight = enc.weight
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same tensor.*nn.ModuleList"):
        call(
            rp,
            mode,
            inner=lambda m, h: (m[1](m[0](x)) ** 2).sum() + h.sum() * (m[0].weight ** 2).sum(),
            outer=lambda m, h: (m[1](m[0](x)) ** 2).sum(),
            params=(enc, dec),
        )


@pytest.mark.parametrize(
    "mode, options",
    [("unroll", {}), ("unroll", {"backend": "higher"}), ("truncated-unroll", {"steps": 4, "truncate": 2})],
)
def test_unrolled_modes_refuse_params_the_inner_loss_does_not_reach(mode, options):
    """The closures call the module, but params is a list of its parameters: the steps would
    not move them and the result would be a silent 0."""
    torch.manual_seed(0)
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    model = nn.Linear(3, 1).double()
    lam = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    inner = lambda p, h: ((model(x) - y) ** 2).mean() + h.exp() * (model.weight**2).sum()
    outer = lambda p, h: ((model(x) - y) ** 2).mean()
    with pytest.raises(ValueError, match="does not depend on params.*pass the module itself"):
        HyperGradient(mode, **options).compute(inner, outer, list(model.parameters()), lam)
    assert HyperGradient(mode, **options).compute(inner, outer, model, lam).abs() > 1e-3  # the fix works


def test_nan_in_loss_says_where(rp):
    with pytest.raises(NonFiniteError, match="the value of outer_loss"):
        call(rp, outer=lambda w, lam: rp.outer_loss(w, lam) * float("nan"))
    with pytest.raises(NonFiniteError, match="inner_loss"):
        call(rp, inner=lambda w, lam: rp.inner_loss(w, lam) + torch.log(-lam.sum().abs()))


def test_overflowing_products_stop_with_the_term(rp):
    with pytest.raises(NonFiniteError, match="term \\d+ of the Neumann series"):
        call(rp, "implicit-neumann", iters=3000, alpha=1e3)


def test_exact_refuses_large_problems():
    big = ridge(p=30)
    with pytest.raises(ValueError, match="30x30 .*max_params=20.*implicit-cg"):
        call(big, "implicit-exact", max_params=20)


class _NonSymmetric(BilevelProblem):
    """A stationarity field that is not a gradient: G(w, φ) = A w − φ with A non-symmetric."""

    symmetric = False
    matrix = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)

    def stationarity(self, theta, phi):
        with torch.enable_grad():
            return (self.matrix @ theta[0] - phi[0],)


def test_symmetric_only_modes_refuse_non_symmetric_systems():
    phi = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    theta = torch.linalg.solve(_NonSymmetric.matrix, phi.detach()).requires_grad_()
    problem = _NonSymmetric(lambda w, p: (w**2).sum() + (p * w).sum(), lambda w, p: w.sum(), theta, phi)
    for mode in ("implicit-cg", "implicit-nystrom"):
        with pytest.raises(ValueError, match="symmetric inner Hessian.*implicit-exact"):
            HyperGradient(mode).solve(problem)
    # dθ*/dφ = A⁻¹, so d(Σθ)/dφ = A⁻ᵀ 1
    expected = torch.linalg.solve(_NonSymmetric.matrix.T, torch.ones(2, dtype=torch.float64))
    for mode, options in [
        ("implicit-exact", {}),
        ("implicit-neumann", {"iters": 200, "alpha": 0.25}),
        ("implicit-gmres", {"tol": 1e-12}),
    ]:
        (grad,) = HyperGradient(mode, **options).solve(problem)
        assert torch.allclose(grad, expected, atol=1e-10), mode


def test_failed_backward_writes_no_grad(rp):
    theta = rp.params_star()
    calls = {"n": 0}

    def outer(w, lam):  # fails on the second hparam path only after partial work
        calls["n"] += 1
        return rp.outer_loss(w, lam) * float("nan")

    with pytest.raises(NonFiniteError):
        HyperGradient("implicit-cg").backward(rp.inner_loss, outer, theta, rp.hparams)
    assert rp.hparams.grad is None and theta.grad is None and calls["n"] == 1


def test_mismatched_structure_in_closure_is_the_users_structure(rp):
    """Closures receive the structure the user passed (a dict here)."""
    seen = {}

    def inner(ps, hs):
        seen["types"] = (type(ps), type(hs))
        return rp.inner_loss(ps["w"], hs[0])

    call(
        rp,
        inner=inner,
        outer=lambda ps, hs: rp.outer_loss(ps["w"], hs[0]),
        params={"w": rp.params_star()},
        hparams=[rp.hparams],
    )
    assert seen["types"] == (dict, list)


def test_structure_change_between_calls_of_a_stateful_mode(rp):
    hg = HyperGradient("implicit-cg", warm_start=True)
    call_args = (rp.inner_loss, rp.outer_loss, rp.params_star(), rp.hparams)
    hg.compute(*call_args)
    inner = lambda ps, lam: rp.inner_loss(ps["w"], lam)
    outer = lambda ps, lam: rp.outer_loss(ps["w"], lam)
    with pytest.raises(ValueError, match="changed structure.*was tensor, now \\{'w': tensor\\}"):
        hg.compute(inner, outer, {"w": rp.params_star()}, rp.hparams)
    stateless = HyperGradient("implicit-cg")
    stateless.compute(*call_args)
    stateless.compute(inner, outer, {"w": rp.params_star()}, rp.hparams)  # fine: nothing carried over


def test_inner_loss_without_graph(rp):
    constant = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="inner_loss returned a tensor without a graph.*detached copies"):
        call(rp, inner=lambda w, lam: constant)
    with pytest.raises(ValueError, match="inner_loss returned a tensor without a graph"):
        call(rp, inner=lambda w, lam: rp.inner_loss(w.detach(), lam.detach()))


def test_no_double_backward_error_suggests_ways_that_work(rp):
    """The error names the first-order ways out (tests/test_first_order.py runs them). The op
    touches only params, so implicit-identity needs no product through it either: its result
    is −α (∇²φθ f) ∂g/∂θ with ∇²φθ f = diag(exp(λ)·w) from the ridge term."""
    points = torch.randn(1, 5, 4, dtype=torch.float64)
    inner = lambda w, lam: rp.inner_loss(w, lam) + torch.cdist(points, w.view(1, 1, 4)).sum()
    with pytest.raises(NoDoubleBackwardError, match="hvp='finite-difference'.*mode='penalty'"):
        call(rp, inner=inner)
    theta = rp.params_star()
    v = torch.autograd.grad(rp.outer_loss(theta, rp.hparams), theta)[0]
    got = call(rp, "implicit-identity", inner=inner, params=theta, alpha=0.3)  # no residual product there
    torch.testing.assert_close(got, -0.3 * rp.hparams.detach().exp() * theta.detach() * v, rtol=1e-12, atol=0)


def test_closure_mixing_devices_names_the_closure(rp):
    """Data on another device than params/hparams (here the meta device, which any machine has)."""
    x_meta = torch.zeros(3, 4, dtype=torch.float64, device="meta")
    with pytest.raises(
        ValueError, match="outer_loss combined tensors on different devices.*\\.to\\('cpu'\\)"
    ):
        call(rp, outer=lambda w, lam: (x_meta @ w).sum())
    with pytest.raises(ValueError, match="inner_loss combined tensors on different devices"):
        call(rp, inner=lambda w, lam: rp.inner_loss(w, lam) + (x_meta @ w).sum())


@pytest.mark.parametrize("mode", ["implicit-cg", "unroll"])
def test_closure_mixing_dtypes_names_the_closure_and_the_fix(rp, mode):
    """float32 data with float64 params: PyTorch's own error names neither the closure nor the fix."""
    x32 = torch.randn(3, 4)
    with pytest.raises(TypeError, match="outer_loss combined tensors of different dtypes.*torch.float64"):
        call(rp, mode, outer=lambda w, lam: (x32 @ w).sum())
    with pytest.raises(TypeError, match="inner_loss combined tensors of different dtypes"):
        call(
            rp,
            mode,
            inner=lambda w, lam: rp.inner_loss(w, lam) + (torch.nn.functional.linear(x32, w[None])).sum(),
        )


@pytest.mark.cuda
def test_cuda_cpu_mixtures_name_the_argument_at_fault():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rp = ridge(p=4, device="cuda")
    cpu_params = rp.params_star().detach().cpu().requires_grad_()
    with pytest.raises(ValueError, match="params is on cpu but hparams\\[0\\] is on cuda:0.*one device"):
        call(rp, params=cpu_params)
    cpu_hparams = rp.hparams.detach().cpu().requires_grad_()
    with pytest.raises(ValueError, match="params is on cuda:0 but hparams\\[0\\] is on cpu"):
        call(rp, hparams=cpu_hparams)
    x_cpu = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="outer_loss combined tensors on different devices.*cuda"):
        call(rp, outer=lambda w, lam: ((x_cpu @ w) ** 2).sum())


def test_hparams_unused_by_inner_loss_warn_once_per_hypergradient(rp):
    phi = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    inner = lambda w, h: rp.inner_loss(w, rp.hparams.detach())
    outer = lambda w, h: rp.outer_loss(w, None) + h**2
    hg = HyperGradient("implicit-cg")
    with pytest.warns(bilevel.HypergradientWarning, match="no hparam affects the gradient of inner_loss"):
        hg.compute(inner, outer, rp.params_star(), phi)
    assert hg.stats.extra["hparams_unused_by_inner"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg.compute(inner, outer, rp.params_star(), phi)  # once per HyperGradient
        # one hparam that does affect the inner loss: no warning
        grads = HyperGradient("implicit-cg").compute(
            lambda w, h: rp.inner_loss(w, h[0]), outer_pair, rp.params_star(), (rp.hparams, phi)
        )
    assert float(grads[1]) == pytest.approx(1.0)


def outer_pair(w, h):
    return (w**2).sum() + h[1] ** 2


@pytest.mark.parametrize(
    "mode, options", [("implicit-cg", {"warm_start": True}), ("unroll", {"steps": 2, "update_params": True})]
)
def test_shape_or_hparams_change_between_calls_of_a_stateful_mode(mode, options):
    small, large = ridge(p=4), ridge(p=5)
    hg = HyperGradient(mode, **options)
    hg.compute(small.inner_loss, small.outer_loss, small.params_star(), small.hparams)
    with pytest.raises(
        ValueError, match="changed structure, shapes or dtype since the last call.*new HyperGradient"
    ):
        hg.compute(large.inner_loss, large.outer_loss, large.params_star(), large.hparams)
    with pytest.raises(ValueError, match="hparams was tensor, now \\(tensor\\)"):
        hg.compute(
            lambda w, h: small.inner_loss(w, h[0]),
            lambda w, h: small.outer_loss(w, h[0]),
            small.params_star(),
            (small.hparams,),
        )
    hg.compute(small.inner_loss, small.outer_loss, small.params_star(), small.hparams)  # same again: fine


def test_modes_whose_state_fits_any_problem_accept_a_new_structure():
    """The Nyström generator is state, but not shaped like the problem: no layout error."""
    small, large = ridge(p=4), ridge(p=7)
    hg = HyperGradient("implicit-nystrom", rank=3, residual=False)
    hg.compute(small.inner_loss, small.outer_loss, small.params_star(), small.hparams)
    grads = hg.compute(
        lambda ps, h: large.inner_loss(ps["w"], h),
        lambda ps, h: large.outer_loss(ps["w"], h),
        {"w": large.params_star()},
        large.hparams,
    )
    assert grads.shape == (7,) and hg.stats.hvps == 3


def test_a_mode_is_one_small_registered_class(rp, monkeypatch):
    """The protocol the modes follow: a dataclass of options with ``hypergradient``."""
    from dataclasses import dataclass
    from typing import ClassVar

    from bilevel._src.tree_math import scale
    from bilevel.implicit import implicit_hypergradient
    from bilevel.modes import base
    from bilevel.solvers import SolveResult

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # keep the registry as it was

    @bilevel.register_mode
    @dataclass
    class HalfIdentity(bilevel.Mode):
        name: ClassVar[str] = "test-half-identity"
        alpha: float = 0.5

        def hypergradient(self, problem, stats):
            return implicit_hypergradient(
                problem, lambda op, v: SolveResult(x=scale(self.alpha, v), products=0, iters=0), stats
            )

    assert "test-half-identity" in bilevel.available_modes()
    got = call(rp, "test-half-identity", alpha=0.2)
    torch.testing.assert_close(got, call(rp, "implicit-identity", alpha=0.2), rtol=0, atol=0)
    with pytest.raises(TypeError, match="unknown option.*beta.*its options are: alpha"):
        HyperGradient("test-half-identity", beta=1.0)
    with pytest.raises(ValueError, match="already registered"):
        bilevel.register_mode(type("Other", (HalfIdentity,), {}))


def test_deferred_nan_checks_name_the_first_place(rp):
    """Checks are read once per call (one host synchronisation), yet still name the place
    where the NaN appeared first, not a later place it propagated to."""
    calls = {"n": 0}

    def inner(w, lam):  # NaN from the 4th evaluation on: unrolled step 3
        calls["n"] += 1
        return rp.inner_loss(w, lam) * (float("nan") if calls["n"] >= 4 else 1.0)

    with pytest.raises(NonFiniteError, match="inner_loss at unrolled step 3"):
        call(rp, "unroll", inner=inner, steps=6)
    with pytest.raises(NonFiniteError, match="the value of inner_loss"):  # not its gradient
        call(rp, "implicit-cg", inner=lambda w, lam: rp.inner_loss(w, lam) * float("nan"))


def test_finite_checks_report_in_order_and_before_a_later_error():
    from bilevel._src.errors import check_finite, deferred_finite_checks

    big, nan = torch.ones(50), torch.tensor(float("nan"))
    with pytest.raises(NonFiniteError, match="in second"), deferred_finite_checks():
        check_finite((big, torch.tensor(1.0)), "first")
        check_finite((big / 0,), "second")  # inf in a large tensor
        check_finite((nan,), "third")  # NaN in a scalar, added later
    with pytest.raises(NonFiniteError, match="in the loss") as caught, deferred_finite_checks():
        check_finite((nan,), "the loss")
        raise RuntimeError("an op failed on the NaN")
    assert isinstance(caught.value.__context__, RuntimeError)
    with deferred_finite_checks():  # nothing wrong: nothing raised
        check_finite((big, None, torch.tensor(2.0, dtype=torch.float64)), "fine")


def test_finite_checks_do_not_mistake_an_overflowing_norm_for_a_nan():
    """The fused check reads one 2-norm per tensor; a finite float32 tensor whose norm
    overflows (entries of 1e30) must pass, and a NaN next to it must still be found."""
    from bilevel._src.errors import check_finite, deferred_finite_checks

    huge = torch.full((10,), 1e30)
    assert not torch.isfinite(huge.norm())  # the case under test: the norm overflows
    with deferred_finite_checks():
        check_finite((huge, torch.tensor(3e38)), "huge but finite")
    check_finite((huge,), "huge but finite, checked at once")
    spoiled = huge.clone()
    spoiled[7] = float("nan")
    with pytest.raises(NonFiniteError, match="in spoiled"), deferred_finite_checks():
        check_finite((huge,), "huge")
        check_finite((torch.ones(3), spoiled), "spoiled")
    with pytest.raises(NonFiniteError, match="in mixed dtypes"):
        check_finite(
            (torch.ones(2, dtype=torch.float64), torch.tensor([1.0, float("inf")], dtype=torch.float16)),
            "mixed dtypes",
        )


def test_a_tensor_in_both_params_and_hparams_is_refused_by_implicit_modes(rp):
    theta = rp.params_star()  # a tie (MAML's init) is for the unrolled modes: see test_maml.py
    with pytest.raises(ValueError, match=r"same tensors as params and hparams.*only the unrolled modes"):
        HyperGradient("implicit-cg").compute(
            lambda p, h: rp.inner_loss(p[0], h[0]),
            lambda p, h: rp.outer_loss(p[0], h[0]) + (h[1] ** 2).sum(),
            (theta,),
            (rp.hparams, theta),
        )


def test_a_layout_change_names_the_shapes():
    inner, outer, w3, lam = shrinkage(3)
    w4 = shrinkage(4)[2]
    hg = HyperGradient("unroll", steps=1, update_params=True, lr=0.1, momentum=0.9)
    hg.compute(inner, outer, w3, lam)
    with pytest.raises(ValueError, match=r"params shapes were \(3,\), now \(4,\)"):
        hg.compute(inner, outer, w4, lam)
