"""Property-based tests (hypothesis) on random strongly convex quadratic bilevel problems.

Inner  f(θ, φ) = ½ θᵀHθ + θᵀ(Bφ + c),   H = Q diag(λ) Qᵀ with λ from λmax/κ to λmax,
Outer  g(θ, φ) = ½‖Rθ − t‖² + θᵀEφ + sᵀφ,
where θ and φ are the concatenated leaves of random pytrees (tensor / tuple / list / dict,
nested, leaves of 0 to 3 dimensions). In closed form:

    θ*(φ) = −H⁻¹(Bφ + c),   v = ∂g/∂θ = Rᵀ(Rθ* − t) + Eφ,   ∂g/∂φ = Eᵀθ* + s,
    ∇²φθ f = Bᵀ,   dg/dφ = Eᵀθ* + s − Bᵀ H⁻¹ v,

and every implicit mode computes ``Eᵀθ* + s − Bᵀ x`` for its own x ≈ H⁻¹v: exact and Krylov
solves x = (H + λI)⁻¹v, the Neumann series x = α Σ_{j<K} (I − αH)ʲ v, Nyström at full rank
x = (H + ρI)⁻¹v, the identity x = αv. Unrolled SGD (step α) started at θ* stays there, and
its K graph-carrying steps give the K-term Neumann series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bilevel import HyperGradient, available_modes

f64 = torch.float64
LAMBDA_MAX = 5.0  # below 2/0.1, so the unrolled modes' default SGD step (lr=0.1) is stable

SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- pytrees
@dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]


_shapes = st.lists(st.integers(1, 4), max_size=3).map(tuple).filter(lambda s: math.prod(s) <= 12)


def pytrees(max_leaves: int) -> st.SearchStrategy:
    """Specs of a tensor or nested tuple/list/dict structure, with Leaf(shape) at the leaves."""
    return st.recursive(
        _shapes.map(Leaf),
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.lists(children, min_size=1, max_size=3),
            st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
        ),
        max_leaves=max_leaves,
    )


def leaves_of(spec) -> list[Leaf]:
    if isinstance(spec, Leaf):
        return [spec]
    values = spec.values() if isinstance(spec, dict) else spec
    return [leaf for child in values for leaf in leaves_of(child)]


def build(spec, vector: torch.Tensor):
    """The structure ``spec`` filled with the entries of ``vector`` in leaf order (fresh leaves
    that require grad)."""
    chunks = iter(vector.split([math.prod(leaf.shape) for leaf in leaves_of(spec)]))

    def fill(s):
        if isinstance(s, Leaf):
            return next(chunks).reshape(s.shape).clone().requires_grad_()
        if isinstance(s, dict):
            return {k: fill(v) for k, v in s.items()}
        return type(s)(fill(v) for v in s)

    return fill(spec)


def tensors_of(tree) -> list[torch.Tensor]:
    """The leaves of a user structure, in order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    values = tree.values() if isinstance(tree, dict) else tree
    return [t for v in values for t in tensors_of(v)]


def flat_of(tree) -> torch.Tensor:
    """The leaves of a user structure concatenated in order (differentiable)."""
    return torch.cat([t.reshape(-1) for t in tensors_of(tree)])


def assert_like(out, spec, dtype: torch.dtype, device: torch.device) -> None:
    """``out`` has the containers, keys and leaf shapes of ``spec``, with finite leaves of
    ``dtype`` on ``device`` that carry no graph."""
    if isinstance(spec, Leaf):
        assert isinstance(out, torch.Tensor) and out.shape == spec.shape
        assert out.dtype == dtype and out.device == device
        assert not out.requires_grad and bool(torch.isfinite(out).all())
    elif isinstance(spec, dict):
        assert type(out) is dict and list(out) == list(spec)
        for k in spec:
            assert_like(out[k], spec[k], dtype, device)
    else:
        assert type(out) is type(spec) and len(out) == len(spec)
        for o, s in zip(out, spec):
            assert_like(o, s, dtype, device)


# ----------------------------------------------------------------------- problems
@dataclass
class Quadratic:
    params_spec: object
    hparams_spec: object
    H: torch.Tensor
    B: torch.Tensor
    c: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor
    E: torch.Tensor
    s: torch.Tensor
    phi: torch.Tensor
    kappa: float

    def __repr__(self) -> str:
        return (
            f"Quadratic(params={self.params_spec}, hparams={self.hparams_spec}, P={len(self.c)}, "
            f"Q={len(self.phi)}, kappa={self.kappa:g})"
        )

    def _repr_pretty_(self, printer, cycle) -> None:  # what hypothesis prints for a failing example
        printer.text(repr(self))

    @property
    def theta_star(self) -> torch.Tensor:
        return -torch.linalg.solve(self.H, self.B @ self.phi + self.c)

    @property
    def v(self) -> torch.Tensor:
        return self.R.T @ (self.R @ self.theta_star - self.t) + self.E @ self.phi

    def hypergradient(self, x: torch.Tensor) -> torch.Tensor:
        """``∂g/∂φ − Bᵀx``: the IFT formula with ``x`` in place of ``H⁻¹v``."""
        return self.E.T @ self.theta_star + self.s - self.B.T @ x

    def exact(self, shift: float = 0.0) -> torch.Tensor:
        eye = torch.eye(len(self.c), dtype=f64)
        return self.hypergradient(torch.linalg.solve(self.H + shift * eye, self.v))

    def neumann(self, iters: int, alpha: float) -> torch.Tensor:
        term, total = self.v, torch.zeros_like(self.v)
        for _ in range(iters):
            total = total + term
            term = term - alpha * (self.H @ term)
        return self.hypergradient(alpha * total)

    @property
    def scale(self) -> float:
        """The size of the two terms of the hypergradient, against which errors are measured."""
        return float((self.E.T @ self.theta_star + self.s).norm() + self.exact().norm() + 1e-300)

    def inner_loss(self, params, hparams):
        theta, phi = flat_of(params), flat_of(hparams)
        H, B, c = (m.to(theta) for m in (self.H, self.B, self.c))
        return 0.5 * theta @ (H @ theta) + theta @ (B @ phi + c)

    def outer_loss(self, params, hparams):
        theta, phi = flat_of(params), flat_of(hparams)
        R, t, E, s = (m.to(theta) for m in (self.R, self.t, self.E, self.s))
        return 0.5 * ((R @ theta - t) ** 2).sum() + theta @ (E @ phi) + s @ phi

    def arguments(self, dtype=f64, device="cpu"):
        """(params at θ*, hparams at φ) in their structures."""
        return (
            build(self.params_spec, self.theta_star.to(dtype=dtype, device=device)),
            build(self.hparams_spec, self.phi.to(dtype=dtype, device=device)),
        )

    def compute(self, mode: str, **options) -> torch.Tensor:
        """The mode's hypergradient (float64, CPU), flattened after checking its structure."""
        params, hparams = self.arguments()
        out = HyperGradient(mode, **options).compute(self.inner_loss, self.outer_loss, params, hparams)
        assert_like(out, self.hparams_spec, f64, torch.device("cpu"))
        return flat_of(out)

    def error(self, got: torch.Tensor, expected: torch.Tensor) -> float:
        return float((got - expected).norm()) / self.scale


def make_quadratic(params_spec, hparams_spec, kappa: float, seed: int) -> Quadratic:
    """A random problem with the given structures and condition number κ of H."""
    g = torch.Generator().manual_seed(seed)
    p = sum(math.prod(leaf.shape) for leaf in leaves_of(params_spec))
    q = sum(math.prod(leaf.shape) for leaf in leaves_of(hparams_spec))
    basis, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=f64))
    spectrum = LAMBDA_MAX * kappa ** -torch.linspace(0.0, 1.0, p, dtype=f64)
    H = basis @ torch.diag(spectrum) @ basis.T

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=f64)

    return Quadratic(
        params_spec,
        hparams_spec,
        H=0.5 * (H + H.T),
        B=randn(p, q),
        c=randn(p),
        R=randn(p + 2, p, scale=p**-0.5),
        t=randn(p + 2),
        E=randn(p, q, scale=0.5),
        s=randn(q),
        phi=randn(q),
        kappa=kappa,
    )


@st.composite
def quadratics(draw, max_kappa: float = 1e3) -> Quadratic:
    params_spec, hparams_spec = draw(pytrees(5)), draw(pytrees(3))
    # the hardest condition number first: hypothesis shrinks towards it
    kappa = draw(st.sampled_from([k for k in (1e3, 1e2, 10.0, 3.0, 1.0) if k <= max_kappa]))
    return make_quadratic(params_spec, hparams_spec, kappa, draw(st.integers(0, 2**31 - 1)))


# a larger, ill-conditioned, nested case that every property also runs on (P = 37, 6 hparams)
LARGE = make_quadratic(
    {"w": Leaf((4, 3, 2)), "rest": (Leaf((3, 4)), [Leaf(())])},
    (Leaf((2, 2)), {"b": Leaf((2,))}),
    kappa=1e3,
    seed=0,
)


# -------------------------------------------------------------------------- properties
@pytest.mark.slow
@settings(max_examples=25, **SETTINGS)
@given(problem=quadratics(), damping=st.sampled_from([0.0, 0.0, 1e-3, 0.5]))
@example(problem=LARGE, damping=0.0)
def test_exact_and_krylov_modes_match_the_closed_form(problem, damping):
    p = len(problem.c)
    assert problem.error(problem.compute("implicit-exact"), problem.exact()) < 1e-9
    # CG terminates in P steps in exact arithmetic; rounding delays it (at κ = 1e3, P steps
    # leave ~1e-3 on LARGE, 2P reach ~1e-14). GMRES (modified Gram-Schmidt) needs only P.
    got = problem.compute("implicit-cg", iters=2 * p, tol=1e-13, damping=damping)
    assert problem.error(got, problem.exact(damping)) < 1e-8
    assert problem.error(problem.compute("implicit-gmres", iters=p, tol=1e-14), problem.exact()) < 1e-8


@settings(max_examples=20, **SETTINGS)
@given(
    problem=quadratics(),
    sketch=st.sampled_from(["gaussian", "columns"]),
    rho=st.sampled_from(["auto", 1e-12]),
    alpha=st.floats(0.01, 2.0),
)
@example(problem=LARGE, sketch="gaussian", rho="auto", alpha=0.5)
def test_nystrom_at_full_rank_and_identity_match_the_closed_form(problem, sketch, rho, alpha):
    """At full rank the sketch is H itself and ρ (below λmin) stands in for nothing."""
    p = len(problem.c)
    got = problem.compute("implicit-nystrom", rank=p, rho=rho, sketch=sketch)
    assert problem.error(got, problem.exact()) < 1e-8
    got = problem.compute("implicit-identity", alpha=alpha)
    assert problem.error(got, problem.hypergradient(alpha * problem.v)) < 1e-12


def test_nystrom_at_full_rank_with_tiny_rho_matches_exact():
    problem = LARGE  # λmin = 5e-3, so the bias of ρ = 1e-12 is ~2e-10
    got = problem.compute("implicit-nystrom", rank=len(problem.c), rho=1e-12)
    assert problem.error(got, problem.exact()) < 1e-8


def test_scalar_leaves_work_in_every_mode():
    """0-dim params and hparams (a temperature, a scalar bias): regression test for
    ``unflat`` reshaping a 0-dim slice with ``reshape(*(), *())``."""
    problem = make_quadratic((Leaf(()), Leaf((2,))), Leaf(()), kappa=10.0, seed=3)
    assert problem.error(problem.compute("implicit-exact"), problem.exact()) < 1e-9
    assert problem.error(problem.compute("implicit-gmres", tol=1e-14), problem.exact()) < 1e-9
    assert problem.error(problem.compute("implicit-nystrom", rho=1e-3), problem.exact()) < 1e-9  # full rank


@settings(max_examples=20, **SETTINGS)
@given(problem=quadratics(), iters=st.integers(1, 40), fraction=st.floats(0.05, 1.95))
@example(problem=LARGE, iters=40, fraction=1.95)
def test_neumann_is_the_truncated_series_for_any_convergent_step(problem, iters, fraction):
    alpha = fraction / LAMBDA_MAX  # α < 2/λmax
    got = problem.compute("implicit-neumann", iters=iters, alpha=alpha)
    assert problem.error(got, problem.neumann(iters, alpha)) < 1e-9


@pytest.mark.slow
@settings(max_examples=10, **SETTINGS)
@given(problem=quadratics(max_kappa=10.0), fraction=st.floats(0.5, 1.5))
@example(problem=make_quadratic(LARGE.params_spec, LARGE.hparams_spec, kappa=10.0, seed=1), fraction=1.5)
def test_neumann_error_shrinks_with_iters_and_converges(problem, fraction):
    alpha = fraction / LAMBDA_MAX
    exact = problem.exact()
    # ‖error_K‖ = ‖Bᵀ(I − αH)ᴷ H⁻¹v‖ ≤ ‖B‖ ‖H⁻¹v‖ ρᴷ with ρ = max|1 − αλ| < 1
    rho = max(abs(1 - alpha * LAMBDA_MAX), abs(1 - alpha * LAMBDA_MAX / problem.kappa))
    bound = float(torch.linalg.matrix_norm(problem.B, 2) * torch.linalg.solve(problem.H, problem.v).norm())
    errors = []
    for iters in (2, 8, 32, 128, 512):
        errors.append(problem.error(problem.compute("implicit-neumann", iters=iters, alpha=alpha), exact))
        assert errors[-1] * problem.scale <= bound * rho**iters * (1 + 1e-6) + 1e-12 * problem.scale
    assert errors[-1] < 1e-9
    got = problem.compute("implicit-neumann", iters=512)  # alpha="auto" converges too
    assert problem.error(got, exact) < 1e-8


@settings(max_examples=10, **SETTINGS)
@given(problem=quadratics(max_kappa=100.0))
@example(problem=make_quadratic(LARGE.params_spec, LARGE.hparams_spec, kappa=100.0, seed=2))
def test_cg_error_shrinks_at_its_convergence_rate_and_converges(problem):
    exact = problem.exact()
    # x₀ = 0, so ‖x* − x_k‖_H ≤ 2 ρᵏ ‖x*‖_H with ρ = (√κ − 1)/(√κ + 1), x* = H⁻¹v, and
    # ‖error_k‖ = ‖Bᵀ(x* − x_k)‖ ≤ ‖B‖ ‖x* − x_k‖_H / √λmin
    root = math.sqrt(problem.kappa)
    rho = (root - 1) / (root + 1)
    x_star = torch.linalg.solve(problem.H, problem.v)
    h_norm = float(torch.sqrt(x_star @ problem.H @ x_star))
    bound = float(torch.linalg.matrix_norm(problem.B, 2)) * 2 * h_norm / math.sqrt(LAMBDA_MAX / problem.kappa)
    for iters in (1, 2, 4, 8, 16):
        got = problem.compute("implicit-cg", iters=iters, tol=0.0)
        assert (
            problem.error(got, exact) * problem.scale
            <= bound * rho**iters * (1 + 1e-6) + 1e-12 * problem.scale
        )
    got = problem.compute("implicit-cg", iters=4 * len(problem.c), tol=1e-14)
    assert problem.error(got, exact) < 1e-9


@settings(max_examples=8, **SETTINGS)
@given(problem=quadratics(), steps=st.integers(1, 6), fraction=st.floats(0.1, 1.9))
@example(problem=LARGE, steps=6, fraction=1.9)
def test_unrolled_sgd_from_the_optimum_is_the_neumann_series(problem, steps, fraction):
    lr = fraction / LAMBDA_MAX
    expected = problem.neumann(steps, lr)
    assert problem.error(problem.compute("unroll", steps=steps, lr=lr), expected) < 1e-9
    got = problem.compute("truncated-unroll", steps=steps + 3, truncate=steps, lr=lr)
    assert problem.error(got, expected) < 1e-9


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")
@settings(max_examples=6, **SETTINGS)
@given(problem=quadratics(max_kappa=100.0), dtype=st.sampled_from([torch.float32, f64]))
@example(problem=LARGE, dtype=torch.float32)
def test_every_registered_mode_returns_the_structure_dtype_and_device_of_hparams(device, problem, dtype):
    for mode in available_modes():  # at its defaults, including modes added later
        params, hparams = problem.arguments(dtype, device)
        before = [t.detach().clone() for t in (flat_of(params), flat_of(hparams))]
        out = HyperGradient(mode).compute(problem.inner_loss, problem.outer_loss, params, hparams)
        assert_like(out, problem.hparams_spec, dtype, tensors_of(hparams)[0].device)
        for tree, value in zip((params, hparams), before):
            assert torch.equal(flat_of(tree).detach(), value)
        assert all(
            leaf.grad is None and leaf.requires_grad
            for tree in (params, hparams)
            for leaf in tensors_of(tree)
        )


def test_strategies_cover_every_kind_of_structure():
    """The generated problems include each container, nesting, and 0- to 3-dimensional leaves."""
    kinds, ndims, nested = set(), set(), False

    @settings(max_examples=60, **SETTINGS)
    @given(spec=pytrees(4))
    def collect(spec):
        nonlocal nested
        kinds.add(type(spec).__name__)
        ndims.update(len(leaf.shape) for leaf in leaves_of(spec))
        values = spec.values() if isinstance(spec, dict) else spec if not isinstance(spec, Leaf) else []
        nested = nested or any(not isinstance(v, Leaf) for v in values)

    collect()
    assert kinds == {"Leaf", "tuple", "list", "dict"} and ndims == {0, 1, 2, 3} and nested
