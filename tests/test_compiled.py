"""The compiled fast path (``compile=...``) gives the eager path's numbers.

Most tests compile with the ``aot_eager`` backend: it traces the whole call exactly as the
default backend does (Dynamo, ``torch.func``, AOTAutograd), so it exercises everything of
ours in the compiled path, in seconds. One test compiles with the default backend (inductor).
"""

import warnings

import pytest
import torch

from bilevel import HyperGradient, HypergradientWarning, NonFiniteError, SolverBreakdownError

from problems import logistic, ridge

TRACE = {"backend": "aot_eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def mlp_problem(seed: int = 0, width: int = 8, dtype: torch.dtype = torch.float64):
    """A small tanh MLP with per-tensor log weight decay: not quadratic, so the Hessian
    products go through real second derivatives of nonlinear ops."""
    g = torch.Generator().manual_seed(seed)
    x, xv = torch.randn(64, 4, generator=g, dtype=dtype), torch.randn(32, 4, generator=g, dtype=dtype)
    y, yv = torch.randn(64, 1, generator=g, dtype=dtype), torch.randn(32, 1, generator=g, dtype=dtype)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)).to(
        dtype
    )
    decay = {n: torch.full((), 0.0, dtype=dtype, requires_grad=True) for n, _ in model.named_parameters()}

    def inner(m, h):
        fit = ((m(x) - y) ** 2).mean()
        return fit + sum(h[n].exp() * (p**2).sum() for n, p in m.named_parameters())

    def outer(m, h):
        return ((m(xv) - yv) ** 2).mean()

    with torch.no_grad():  # near the inner minimum, where the Hessian is positive definite
        opt = torch.optim.LBFGS(
            model.parameters(), max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            with torch.enable_grad():
                loss = inner(model, {n: t.detach() for n, t in decay.items()})
                loss.backward()
            return loss

        opt.step(closure)
    return inner, outer, model, decay


def max_difference(a, b) -> float:
    if isinstance(a, dict):
        return max(float((a[k] - b[k]).abs().max()) for k in a)
    return float((a - b).abs().max())


def run_both(mode, args, calls=3, **options):
    """Results of the eager and the compiled HyperGradient over ``calls`` calls."""
    eager, fast = HyperGradient(mode, **options), HyperGradient(mode, compile=TRACE, **options)
    pairs = []
    for _ in range(calls):
        pairs.append((eager.compute(*args), fast.compute(*args), eager.stats, fast.stats))
    return pairs


# ------------------------------------------------------------------------------- implicit
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, options",
    [
        ("implicit-cg", {"iters": 5}),
        ("implicit-cg", {"iters": 5, "tol": 0.1, "damping": 0.1}),  # converges early: frozen iterations
        ("implicit-neumann", {"iters": 4, "power_iters": 2}),  # a fixed alpha: the divergence test
        ("implicit-neumann", {"iters": 4, "power_iters": 2, "residual": False}),
    ],
)
def test_implicit_matches_eager_on_an_mlp(mode, options):
    args = mlp_problem()
    pairs = run_both(mode, args, **options)
    assert "compiled" not in pairs[0][3].extra  # the first call of a layout is eager, with its checks
    if options.get("tol") == 0.1:
        assert pairs[1][2].iters < options["iters"]
    for eager, fast, eager_stats, fast_stats in pairs[1:]:
        assert fast_stats.extra["compiled"]
        assert max_difference(fast, eager) <= 1e-12 * max(float(t.abs().max()) for t in eager.values())
        assert fast_stats.iters == eager_stats.iters
        if options.get("residual", True):
            assert fast_stats.residual == pytest.approx(eager_stats.residual, rel=1e-6, abs=1e-14)
        else:
            assert fast_stats.residual is eager_stats.residual is None
        assert fast_stats.converged == eager_stats.converged
        if mode == "implicit-neumann":
            assert fast_stats.extra["alpha"] == pytest.approx(eager_stats.extra["alpha"], rel=1e-12)
            assert fast_stats.hvps == eager_stats.hvps


@pytest.mark.slow
def test_compiled_cg_is_the_exact_ridge_hypergradient():
    problem = ridge()
    hg = HyperGradient("implicit-cg", iters=20, tol=1e-13, compile=TRACE)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    hg.compute(*args)
    result = hg.compute(*args)
    assert hg.stats.extra["compiled"] and hg.stats.converged and hg.stats.iters == 6  # P = 6
    assert hg.stats.hvps == 20 + 1  # the compiled solve always spends its budget, and the true residual
    exact = problem.exact_hypergradient()
    assert float((result - exact).norm() / exact.norm()) < 1e-10


def test_compiled_cg_stops_at_negative_curvature_like_eager():
    # a saddle: f = ½ wᵀ diag(1, −1, 2) w + λ·w; CG's second direction has negative curvature
    diagonal = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    target = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    inner = lambda w, lam: 0.5 * (diagonal * w**2).sum() + (lam * w).sum()
    outer = lambda w, lam: ((w - target) ** 2).sum()
    w = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64, requires_grad=True)
    lam = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradientWarning)
        pairs = run_both("implicit-cg", (inner, outer, w, lam), calls=2, iters=10)
    eager, fast, eager_stats, fast_stats = pairs[1]
    assert eager_stats.negative_curvature and fast_stats.negative_curvature
    assert fast_stats.iters == eager_stats.iters and not fast_stats.converged
    assert max_difference(fast, eager) < 1e-15


@pytest.mark.slow
def test_compiled_warm_start_follows_the_eager_sequence():
    problem = ridge()
    eager = HyperGradient("implicit-cg", iters=30, tol=1e-10, warm_start=True)
    fast = HyperGradient("implicit-cg", iters=30, tol=1e-10, warm_start=True, compile=TRACE)
    w = problem.params_star()
    for step in range(4):
        lam = (problem.hparams.detach() + 0.01 * step).requires_grad_()
        a = eager.compute(problem.inner_loss, problem.outer_loss, w, lam)
        b = fast.compute(problem.inner_loss, problem.outer_loss, w, lam)
        assert max_difference(a, b) < 1e-13
        if step >= 2:  # warm: the eager solve needs one product, the compiled one spends 1 + iters
            assert eager.stats.hvps < 30 and fast.stats.hvps == 31 + 1  # and the true residual
    assert (
        max_difference(eager.state_dict()["state"]["previous"][0], fast.state_dict()["state"]["previous"][0])
        < 1e-13
    )


def test_compiled_neumann_with_a_fixed_alpha_reports_divergence_like_eager():
    problem = ridge()
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradientWarning)
        pairs = run_both("implicit-neumann", args, calls=2, iters=8, alpha=10.0)
    eager, fast, eager_stats, fast_stats = pairs[1]
    assert fast_stats.extra["compiled"] and fast_stats.diverged and eager_stats.diverged
    assert float((fast - eager).norm() / eager.norm()) < 1e-12
    strict = HyperGradient("implicit-neumann", iters=8, alpha=10.0, compile=TRACE, strict=True)
    for _ in range(2):
        with pytest.raises(SolverBreakdownError, match="diverged"):
            strict.compute(*args)


def test_new_data_reuses_the_program_and_new_shapes_recheck():
    torch.manual_seed(0)
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    inner = lambda w, lam: ((x @ w - y) ** 2).mean() + (lam.exp() * w**2).sum()
    outer = lambda w, lam: ((x @ w - 1.0) ** 2).mean()
    lam = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    fast, eager = (
        HyperGradient("implicit-cg", iters=10, compile=TRACE),
        HyperGradient("implicit-cg", iters=10),
    )
    for shape in [(3,), (3,), (3,), (5,)]:
        if shape == (5,):
            x, lam = (
                torch.randn(30, 5, dtype=torch.float64),
                torch.zeros(5, dtype=torch.float64, requires_grad=True),
            )
        x.copy_(torch.randn_like(x))  # new values in the same tensor: the program reads them
        w = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        assert max_difference(fast.compute(inner, outer, w, lam), eager.compute(inner, outer, w, lam)) < 1e-14
    assert "compiled" not in fast.stats.extra  # a new layout: its first call is eager again


def test_nan_in_a_compiled_call_is_named():
    problem = ridge()
    x = torch.randn(10, 6, dtype=torch.float64)
    inner = lambda w, lam: ((x @ w) ** 2).mean() + (lam.exp() * w**2).sum()
    hg = HyperGradient("implicit-cg", iters=5, compile=TRACE)
    w = problem.params_star()
    hg.compute(inner, problem.outer_loss, w, problem.hparams)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="conjugate-gradient"):
        hg.compute(inner, problem.outer_loss, w, problem.hparams)


def test_capture_failure_falls_back_with_one_warning():
    problem = ridge()

    def inner(w, lam):  # what an untraceable op in a user's closure does: a graph break
        torch._dynamo.graph_break()
        return problem.inner_loss(w, lam)

    args = (inner, problem.outer_loss, problem.params_star(), problem.hparams)
    hg = HyperGradient("implicit-cg", iters=10, compile=TRACE)
    reference = HyperGradient("implicit-cg", iters=10).compute(*args)
    hg.compute(*args)
    with pytest.warns(HypergradientWarning, match="could not capture.*eager path") as caught:
        result = hg.compute(*args)
    assert "line" in str(caught[0].message) and "in inner" in str(caught[0].message)  # names the user's code
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = hg.compute(*args)
    assert hg.mode._fast.failure and "compiled" not in hg.stats.extra
    assert max_difference(result, reference) == 0.0


def test_compile_option_is_checked():
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        HyperGradient("implicit-cg", compile="yes")


@pytest.mark.slow
def test_default_backend_matches_eager():
    """The default backend (inductor, C++ on CPU) on a tiny problem: generated kernels give the
    eager numbers to float64 rounding."""
    problem = logistic()
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    fast = HyperGradient("implicit-cg", iters=3, compile=True)
    eager = HyperGradient("implicit-cg", iters=3).compute(*args)
    fast.compute(*args)
    result = fast.compute(*args)
    assert fast.stats.extra["compiled"]
    assert float((result - eager).norm() / eager.norm()) < 1e-12


# ------------------------------------------------------------------------------- unrolled
def sgd_problem():
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(40, 5, generator=g, dtype=torch.float64),
        torch.randn(40, generator=g, dtype=torch.float64),
    )
    xv, yv = (
        torch.randn(20, 5, generator=g, dtype=torch.float64),
        torch.randn(20, generator=g, dtype=torch.float64),
    )
    hparams = {
        "decay": torch.full((5,), -1.0, dtype=torch.float64, requires_grad=True),
        "log_lr": torch.tensor(-2.0, dtype=torch.float64, requires_grad=True),
        "momentum": torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
    }
    inner = lambda w, h: ((x @ w - y) ** 2).mean() + (h["decay"].exp() * w**2).sum()
    outer = lambda w, h: ((xv @ w - yv) ** 2).mean() + 0.1 * h["decay"].sum()
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    return inner, outer, w, hparams


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, options",
    [
        ("unroll", {"steps": 6}),
        ("unroll", {"steps": 6, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        ("unroll", {"steps": 6, "momentum": 0.9, "dampening": 0.3, "maximize": False}),
        ("unroll", {"steps": 6, "backend": "higher", "momentum": 0.9}),
        ("truncated-unroll", {"steps": 6, "truncate": 2, "momentum": 0.5}),
        ("unroll", {"steps": 6, "lr": lambda h: h["log_lr"].exp(), "momentum": "hparam"}),
    ],
)
def test_unrolled_sgd_matches_eager(mode, options):
    inner, outer, w, hparams = sgd_problem()
    if options.get("momentum") == "hparam":
        options = {**options, "momentum": hparams["momentum"]}
    pairs = run_both(mode, (inner, outer, w, hparams), **options)
    for eager, fast, _, fast_stats in pairs[1:]:
        assert fast_stats.extra["compiled"]
        assert max_difference(fast, eager) < 1e-14
    if callable(options.get("lr")):  # the settings that are hyperparameters get their hypergradients
        assert abs(float(pairs[-1][1]["log_lr"])) > 1e-3 and abs(float(pairs[-1][1]["momentum"])) > 1e-4


def test_unrolled_sgd_with_batches_and_update_params_matches_eager():
    inner, outer, _, hparams = sgd_problem()
    g = torch.Generator().manual_seed(4)
    batches = [
        (
            torch.randn(8, 5, generator=g, dtype=torch.float64),
            torch.randn(8, generator=g, dtype=torch.float64),
        )
        for _ in range(5)
    ]
    batch_inner = lambda w, h, b: ((b[0] @ w - b[1]) ** 2).mean() + (h["decay"].exp() * w**2).sum()
    w_eager, w_fast = (torch.zeros(5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    options = {"steps": 3, "inner_batches": batches, "update_params": True, "lr": 0.1}
    eager, fast = HyperGradient("unroll", **options), HyperGradient("unroll", compile=TRACE, **options)
    for _ in range(4):  # 12 steps: the batches wrap around
        a = eager.compute(batch_inner, outer, w_eager, hparams)
        b = fast.compute(batch_inner, outer, w_fast, hparams)
        assert max_difference(a, b) < 1e-14 and float((w_eager - w_fast).detach().abs().max()) < 1e-14
    assert fast.stats.extra["compiled"]


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"inner_optimizer": torch.optim.Adam}, "torch.optim.SGD only"),
        ({"measure_memory": True}, "measure_memory"),
        ({"update_params": True, "momentum": 0.9}, "update_params=True with momentum"),
    ],
)
def test_unsupported_unrolled_configurations_run_eagerly_with_a_warning(options, reason):
    with pytest.warns(HypergradientWarning, match=f"compile=True: unroll runs eagerly because .*{reason}"):
        hg = HyperGradient("unroll", steps=3, compile=TRACE, **options)
    inner, outer, w, hparams = sgd_problem()
    for _ in range(2):
        hg.compute(inner, outer, w, hparams)
    assert "compiled" not in hg.stats.extra


@pytest.mark.slow
def test_layouts_keep_their_programs_up_to_the_recompile_limit():
    torch.manual_seed(0)

    def layout(p):
        x = torch.randn(20, p, dtype=torch.float64)
        inner = lambda w, lam: ((x @ w - 1.0) ** 2).mean() + (lam.exp() * w**2).sum()
        outer = lambda w, lam: ((x @ w) ** 2).mean()
        return (
            inner,
            outer,
            torch.zeros(p, dtype=torch.float64, requires_grad=True),
            torch.zeros(p, dtype=torch.float64, requires_grad=True),
        )

    a, b, c = layout(2), layout(3), layout(4)
    hg = HyperGradient("implicit-cg", iters=2, compile=TRACE)
    hg.mode._fast.limit = 2
    compiled = []
    for args in [a, b, a, b, a]:  # alternating problems stay compiled once each has been seen
        hg.compute(*args)
        compiled.append(bool(hg.stats.extra.get("compiled")))
    assert compiled == [False, False, True, True, True]
    with pytest.warns(HypergradientWarning, match="recompile limit; new layouts run on the eager path"):
        hg.compute(*c)
    hg.compute(*c)
    assert "compiled" not in hg.stats.extra
    hg.compute(*b)
    assert hg.stats.extra["compiled"]


# ------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize(
    "mode",
    [pytest.param("implicit-cg", marks=pytest.mark.slow), "implicit-neumann"],  # the cg case compiles
)
def test_bfloat16_products_cost_a_bounded_accuracy(mode):
    inner, outer, model, decay = mlp_problem(width=32, dtype=torch.float32)
    options = {"iters": 10, "tol": 0.0} if mode == "implicit-cg" else {"iters": 10}
    exact = HyperGradient(mode, **options).compute(inner, outer, model, decay)
    low = HyperGradient(mode, autocast=torch.bfloat16, **options)
    approximate = low.compute(inner, outer, model, decay)
    error = max_difference(approximate, exact) / max(float(t.abs().max()) for t in exact.values())
    assert 1e-6 < error < 0.1  # it runs in bf16 (not float32), and within bf16's few digits
    assert all(t.dtype == torch.float32 for t in approximate.values())
    if mode != "implicit-cg":
        return
    compiled = HyperGradient(mode, autocast=torch.bfloat16, compile=TRACE, **options)
    for _ in range(2):
        result = compiled.compute(inner, outer, model, decay)
    assert compiled.stats.extra["compiled"]
    assert max_difference(result, approximate) / max(float(t.abs().max()) for t in exact.values()) < 1e-3


def test_autocast_option_is_checked():
    with pytest.raises(TypeError, match="autocast must be None, torch.bfloat16 or torch.float16"):
        HyperGradient("implicit-cg", autocast="bf16")
    problem = ridge()  # float64
    with pytest.raises(ValueError, match="float32 products, but params are torch.float64"):
        HyperGradient("implicit-cg", autocast=torch.bfloat16).compute(
            problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams
        )


def test_problems_with_their_own_stationarity_map_run_eagerly():
    """A subclass with another stationarity map (module-aware weighting, here 2·∇θf, which
    has the same hypergradient) must not be compiled as if its map were ∇θf."""
    from bilevel import BilevelProblem

    class Doubled(BilevelProblem):
        symmetric = False

        def stationarity(self, theta, phi):
            return tuple(2 * g for g in super().stationarity(theta, phi))

    problem = ridge()
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    fast = HyperGradient("implicit-neumann", iters=300, compile=TRACE)
    eager = HyperGradient("implicit-neumann", iters=300)
    expected = eager.solve(Doubled(*args))
    with pytest.warns(HypergradientWarning, match="Doubled defines its own stationarity"):
        for _ in range(2):
            result = fast.solve(Doubled(*args))
    assert "compiled" not in fast.stats.extra
    assert max_difference(result[0], expected[0]) == 0.0
    assert (
        float((result[0] - problem.exact_hypergradient()).norm() / problem.exact_hypergradient().norm())
        < 1e-6
    )


@pytest.mark.parametrize("training", [pytest.param(False, marks=pytest.mark.slow), True])  # False compiles
def test_modules_with_buffers(training):
    """Eval-mode BatchNorm (buffers read) compiles, with a module as hparams; train mode
    (buffers updated in place inside a torch.func transform) falls back to eager with a warning.
    The user's modules are left as they were either way."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    model = (
        torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        .double()
        .train(training)
    )
    weigher = torch.nn.Linear(1, 1).double()
    one = torch.ones(1, dtype=torch.float64)
    inner = lambda m, a: (
        ((m(x) - y) ** 2).mean() + a(one).exp().sum() * sum((p**2).sum() for p in m.parameters())
    )
    outer = lambda m, a: ((m(x) - y) ** 2).mean()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast, eager = HyperGradient("unroll", steps=3, compile=TRACE), HyperGradient("unroll", steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            result, expected = (
                fast.compute(inner, outer, model, weigher),
                eager.compute(inner, outer, model, weigher),
            )
    assert max_difference(result, expected) < 1e-14
    assert bool(fast.stats.extra.get("compiled")) is not training
    assert any("could not capture" in str(w.message) for w in caught) is training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("mode, options", [("implicit-cg", {"iters": 4}), ("unroll", {"steps": 2})])
def test_closures_made_each_step_share_one_program_and_read_their_own_batch(mode, options):
    """The pattern of a training loop (and of AuxiliaryLearner): new closures every step that
    capture the step's batch. They share the program (no recompilation) and each call reads its
    own batch, not the first one's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    weights = torch.nn.Linear(1, 1).double()
    one = torch.ones(1, dtype=torch.float64)
    fast, eager = HyperGradient(mode, compile=TRACE, **options), HyperGradient(mode, **options)
    counters.clear()
    for step in range(4):
        x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

        def inner(m, w):
            return ((m(x) - y) ** 2).mean() + w(one).exp().sum() * sum((p**2).sum() for p in m.parameters())

        def outer(m, w):
            return ((m(x) - 2 * y) ** 2).mean()

        result, expected = (
            fast.compute(inner, outer, model, weights),
            eager.compute(inner, outer, model, weights),
        )
        assert max_difference(result, expected) < 1e-13 * max(float(t.abs().max()) for t in expected.values())
        assert bool(fast.stats.extra.get("compiled")) is (step > 0)
    assert counters["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, options",
    [
        ("implicit-cg", {"iters": 6, "tol": 0.0, "damping": 0.5}),
        ("implicit-neumann", {"iters": 6, "alpha": 0.05}),
        ("unroll", {"steps": 4, "lr": 0.1, "momentum": 0.5}),
    ],
)
def test_cuda_graph_replays_read_each_batch_and_keep_earlier_results(mode, options):
    """compile=True on CUDA: inductor kernels replayed as a CUDA graph (mode="reduce-overhead").
    Each step's closures capture a new batch; every replay must read its own batch, match the
    eager result, and must not overwrite the result an earlier step returned (the graph's
    output memory is reused by the next replay)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).cuda()
    decay = {n: torch.full_like(p, -3.0, requires_grad=True) for n, p in model.named_parameters()}
    fast, eager = HyperGradient(mode, compile=True, **options), HyperGradient(mode, **options)
    counters.clear()
    results, expected = [], []
    for step in range(5):
        x, y = torch.randn(128, 8, device="cuda"), torch.randint(0, 3, (128,), device="cuda")

        def inner(m, h):
            decay_term = sum((h[n].exp() * p**2).sum() for n, p in m.named_parameters())
            return torch.nn.functional.cross_entropy(m(x), y) + 0.5 * decay_term

        def outer(m, h):
            return torch.nn.functional.cross_entropy(m(x[:64]), y[:64])

        results.append(fast.compute(inner, outer, model, decay))
        expected.append(eager.compute(inner, outer, model, decay))
        assert bool(fast.stats.extra.get("compiled")) is (step > 0)
    for result, reference in zip(results, expected):  # also checks that no result was overwritten
        error = max(float((result[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
        assert error < 1e-4, error
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["stats"]["unique_graphs"] == 1
