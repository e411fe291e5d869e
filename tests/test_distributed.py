"""``distributed=...``: W gloo processes on 127.0.0.1 return the single-process hypergradient.

Every rank holds 1/W of the training and validation rows; its closures return the mean loss
over its rows. Each run of ranks (W = 2 and W = 3: three ranks meet summation orders that two
hide) computes every scenario of this module in one spawn, under a hard timeout, and the
tests compare the ranks' results with one process that holds all the rows.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from parallel import outcome, rel, run_ranks
from torch import nn

import bilevel

N, N_VAL, P = 36, 30, 4  # rows divisible by 2 and 3

#: (mode, options): every mode, converged where it converges, and the unrolled variants
MODES = [
    ("implicit-cg", {"iters": 200, "tol": 1e-13}),
    ("implicit-cg", {"iters": 200, "tol": 1e-12, "hvp": "finite-difference"}),
    ("implicit-exact", {}),
    ("implicit-gmres", {"tol": 1e-13}),
    ("implicit-minres", {"tol": 1e-13}),
    ("implicit-neumann", {"iters": 3000, "tol": 1e-13}),
    ("implicit-nystrom", {"rank": P + 1}),
    ("implicit-identity", {}),
    ("penalty", {}),
    ("unroll", {"steps": 12, "lr": 0.3}),
    ("unroll", {"steps": 12, "lr": 0.3, "backend": "higher"}),
    ("unroll", {"steps": 12, "lr": 0.3, "checkpoint": 3}),
    ("unroll", {"steps": 12, "inner_optimizer": torch.optim.Adam, "lr": 0.05}),
    ("truncated-unroll", {"steps": 12, "truncate": 4, "lr": 0.3}),
    ("unroll", {"steps": 6, "lr": 0.3, "direction": "forward"}),
]


def label(mode: str, options: dict) -> str:
    shown = {k: getattr(v, "__name__", v) for k, v in options.items() if k not in ("iters", "tol", "steps")}
    return mode + ("" if not shown else str(shown))


def data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, P, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(P, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(
        N, generator=g, dtype=torch.float64
    )
    xv = torch.randn(N_VAL, P, generator=g, dtype=torch.float64)
    yv = torch.tanh(xv @ torch.randn(P, generator=g, dtype=torch.float64))
    return x, y, xv, yv


def losses(x, y, xv, yv):
    def inner(w, log_decay):
        return (torch.tanh(x @ w) - y).pow(2).mean() + 0.5 * (log_decay.exp() * w**2).sum()

    def outer(w, log_decay):
        return (torch.tanh(xv @ w) - yv).pow(2).mean()

    return inner, outer


def minimiser(inner, log_decay: torch.Tensor) -> torch.Tensor:
    """θ* of the full-batch inner problem (Newton's method; the same bits on every rank)."""
    w = torch.zeros(P, dtype=torch.float64)
    for _ in range(30):
        w = w.detach().requires_grad_()
        grad = torch.autograd.grad(inner(w, log_decay), w, create_graph=True)[0]
        hess = torch.stack([torch.autograd.grad(grad[i], w, retain_graph=True)[0] for i in range(P)])
        w = w - torch.linalg.solve(hess, grad.detach())
    return w.detach()


def initial(mode: str, w: torch.Tensor) -> torch.Tensor:
    """θ*: the implicit modes' point; halfway to it: the unrolled runs' start (Adam's
    normalisation is singular at a zero gradient)."""
    return w if mode.startswith("implicit") else (0.5 * w).detach().requires_grad_()


def shard(tensors, rank: int, world: int):
    return tuple(t.chunk(world)[rank] for t in tensors)


def start(rank: int = 0, world: int = 1):
    """(closures on this rank's rows, θ* of the full problem, φ)."""
    full = data()
    log_decay = torch.full((P,), -2.0, dtype=torch.float64)
    w = minimiser(losses(*full)[0], log_decay).requires_grad_()
    return losses(*shard(full, rank, world)), w, log_decay.clone().requires_grad_()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.hidden = nn.Linear(P, 5).double()
        self.out = nn.Linear(5, 1).double()

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


def module_losses(x, y, xv, yv):
    def inner(net, log_decay):
        decay = sum(p.pow(2).sum() for p in net.parameters())
        return (net(x) - y).pow(2).mean() + log_decay.exp() * decay

    def outer(net, log_decay):
        return (net(xv) - yv).pow(2).mean()

    return inner, outer


def module_result(rank: int, world: int, wrap: bool, mode: str = "unroll", **options) -> np.ndarray:
    """A DDP module's (``wrap``) or a plain module's hypergradient: 31 params, one hparam."""
    net = Net()
    if wrap:
        net = nn.parallel.DistributedDataParallel(net)
    log_decay = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    inner, outer = module_losses(*shard(data(), rank, world))
    options = options or {"steps": 5, "lr": 0.1}
    hg = bilevel.HyperGradient(mode, distributed=world > 1 or None, **options)
    return hg.compute(inner, outer, net, log_decay).numpy()


def fixed_point(inner):
    """T(θ, φ) = θ − 0.3 ∇θ f: a gradient step, as a FixedPoint condition."""

    def step(w, log_decay):
        return w - 0.3 * torch.autograd.grad(inner(w, log_decay), w, create_graph=True)[0]

    return bilevel.FixedPoint(step)


CONDITION_MODES = [("unroll", {"steps": 6}), ("implicit-gmres", {"tol": 1e-13})]


def uneven(rank: int, world: int) -> np.ndarray:
    """CG on shards of unequal sizes, the closures' means weighted by ``shard_weight``."""
    from bilevel.distributed import shard_weight

    x, y, xv, yv = data()
    cuts = [0, 14, 26, 36] if world == 3 else [0, 22, 36]
    val_cuts = [0, 7, 19, 30] if world == 3 else [0, 12, 30]
    rows, val_rows = (slice(c[rank], c[rank + 1]) for c in (cuts, val_cuts))
    inner, outer = losses(x[rows], y[rows], xv[val_rows], yv[val_rows])
    weight, val_weight = (shard_weight(r.stop - r.start) for r in (rows, val_rows))
    _, w, log_decay = start()
    hg = bilevel.HyperGradient("implicit-cg", distributed=True, iters=200, tol=1e-13)
    weighted = (lambda a, b: weight * inner(a, b), lambda a, b: val_weight * outer(a, b))
    return hg.compute(*weighted, w, log_decay).numpy()


def scenario(rank: int, world: int) -> dict:
    """Everything a rank reports: each mode's hypergradient and collectives, and the
    outcomes of the calls that must fail on every rank (then one that must work again)."""
    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    (inner, outer), w, log_decay = start(rank, world)
    report: dict = {"modes": {}}
    for mode, options in MODES:
        hg = bilevel.HyperGradient(mode, distributed=True, **options)
        grad = hg.compute(inner, outer, initial(mode, w), log_decay)
        report["modes"][label(mode, options)] = (grad.numpy(), hg.stats.extra["collectives"], hg.stats.hvps)
    hg = bilevel.HyperGradient("implicit-cg", distributed=True, local_solves=True, iters=200, tol=1e-13)
    report["local_solves"] = hg.compute(inner, outer, w, log_decay).numpy()
    nystrom = bilevel.HyperGradient("implicit-nystrom", rank=2, generator=rank, distributed=True)
    report["nystrom_seeded_per_rank"] = nystrom.compute(inner, outer, w, log_decay).numpy()
    report["ddp"] = module_result(rank, world, wrap=True)
    report["ddp_cg"] = module_result(rank, world, True, "implicit-minres", tol=1e-13)
    for mode, options in CONDITION_MODES:
        hg = bilevel.HyperGradient(mode, distributed=True, **options)
        report[f"fixed_point {mode}"] = hg.compute(
            fixed_point(inner), outer, initial(mode, w), log_decay
        ).numpy()
    report["uneven"] = uneven(rank, world)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local = bilevel.HyperGradient("implicit-cg", iters=200, tol=1e-13)
        report["unsaid"] = local.compute(inner, outer, w, log_decay).numpy()
    report["unsaid_warnings"] = [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = bilevel.HyperGradient("implicit-cg", distributed=True, compile=True, iters=200, tol=1e-13)
        for _ in range(2):  # the first call of a layout runs eagerly anyway
            report["compiled"] = compiled.compute(inner, outer, w, log_decay).numpy()
    report["compile_warnings"] = [str(w.message) for w in caught]

    hg = bilevel.HyperGradient("implicit-cg", distributed=True, iters=50)
    moved = log_decay.detach() + (1e-12 if rank == 1 else 0.0)
    report["hparams_differ"] = outcome(lambda: hg.compute(inner, outer, w, moved.requires_grad_()))

    def outer_failing_on_rank_1(w, log_decay):
        if rank == 1:
            raise KeyError("a bad batch on rank 1")
        return outer(w, log_decay)

    report["closure_raises"] = outcome(lambda: hg.compute(inner, outer_failing_on_rank_1, w, log_decay))
    nan_data = float("nan") if rank == world - 1 else 1.0
    report["nan_on_one_rank"] = outcome(
        lambda: hg.compute(lambda a, b: inner(a, b) * nan_data, outer, w, log_decay)
    )
    strict = bilevel.HyperGradient("implicit-cg", distributed=True, strict=True, iters=1, tol=1e-14)
    report["strict"] = outcome(lambda: strict.compute(inner, outer, w, log_decay))
    unrolled = bilevel.HyperGradient("unroll", distributed=True, steps=3)
    report["params_unused"] = outcome(
        lambda: unrolled.compute(lambda a, b: (b**2).sum(), outer, w, log_decay)
    )
    calls = [0]

    def interrupted_on_rank_0(w, log_decay):  # mid-solve: at the closure's third evaluation
        calls[0] += 1
        if rank == 0 and calls[0] == 3:
            raise KeyboardInterrupt
        return inner(w, log_decay)

    differences = bilevel.HyperGradient("implicit-cg", distributed=True, iters=50, hvp="finite-difference")
    try:  # finite differences evaluate the closure at every product: the third is mid-solve
        report["interrupt"] = outcome(lambda: differences.compute(interrupted_on_rank_0, outer, w, log_decay))
    except KeyboardInterrupt:
        report["interrupt"] = ("KeyboardInterrupt", "")
    for mode, options in (("implicit-cg", {"iters": 200, "tol": 1e-13}), ("unroll", {"steps": 4})):
        # a term only rank 0's closures have (W times its share): the ranks' graphs differ
        own = bilevel.HyperGradient(mode, distributed=True, **options)
        penalty = (lambda d: world * 0.3 * (d**2).sum()) if rank == 0 else (lambda d: 0.0)
        uneven_terms = (lambda a, b: inner(a, b) + penalty(b), lambda a, b: outer(a, b) + penalty(b))
        report[f"rank_0_term {mode}"] = own.compute(*uneven_terms, initial(mode, w), log_decay).numpy()
    if world == 3:
        import torch.distributed as dist

        subgroup = dist.new_group([0, 1])
        report["subgroup"] = outcome(lambda: bilevel.HyperGradient("implicit-cg", distributed=subgroup))
        if rank < 2:
            sub = bilevel.HyperGradient("implicit-cg", distributed=subgroup, local_solves=True, iters=5)
            report["subgroup"] = ("ok", str(sub.compute(inner, outer, w, log_decay).numpy()))
    report["after_failures"] = hg.compute(inner, outer, w, log_decay).numpy()
    return report


@functools.cache
def ranks(world: int) -> tuple:
    return tuple(run_ranks(scenario, world, timeout=120))


@functools.cache
def single() -> dict:
    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    (inner, outer), w, log_decay = start()
    out = {}
    for mode, options in MODES:
        hg = bilevel.HyperGradient(mode, **options)
        out[label(mode, options)] = hg.compute(inner, outer, initial(mode, w), log_decay)
    return out


WORLDS = [2, pytest.param(3, marks=pytest.mark.slow)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", [label(m, o) for m, o in MODES])
def test_every_mode_equals_the_single_process_result(world, case):
    results = ranks(world)
    grad, collectives, hvps = results[0]["modes"][case]
    assert rel(grad, single()[case].numpy()) < 1e-9
    for other in results[1:]:
        assert np.array_equal(other["modes"][case][0], grad)  # bit-identical on every rank
    assert collectives >= 3


@pytest.mark.parametrize("world", WORLDS)
def test_implicit_modes_make_one_collective_per_product_plus_five(world):
    # the agreement, ∇θ f's graph, ∂g/∂θ with ∂g/∂φ... measured: five besides the products
    for case in ("implicit-cg", "implicit-exact", "implicit-minres", "implicit-nystrom{'rank': 5}"):
        _, collectives, hvps = ranks(world)[0]["modes"][case]
        assert collectives == hvps + 5


@pytest.mark.parametrize("world", WORLDS)
def test_an_unrolled_step_is_one_collective_forward_and_one_backward(world):
    _, collectives, _ = ranks(world)[0]["modes"]["unroll{'lr': 0.3}"]
    assert collectives == 2 * 12 + 3  # the agreement, the outer gradient, the finish


def local_reference(world: int, **options) -> np.ndarray:
    """The mean over ranks of each rank's own single-process hypergradient."""
    grads = []
    for rank in range(world):
        (inner, outer), w, log_decay = start(rank, world)
        grads.append(bilevel.HyperGradient("implicit-cg", **options).compute(inner, outer, w, log_decay))
    return torch.stack(grads).mean(0).numpy()


@pytest.mark.parametrize("world", WORLDS)
def test_local_solves_average_the_ranks_own_hypergradients(world):
    results = ranks(world)
    expected = local_reference(world, iters=200, tol=1e-13)
    assert rel(results[0]["local_solves"], expected) < 1e-12
    exact = single()["implicit-cg"].numpy()
    assert rel(results[0]["local_solves"], exact) > 1e-3  # an approximation, and it shows
    assert all(np.array_equal(r["local_solves"], results[0]["local_solves"]) for r in results)


@pytest.mark.parametrize("world", WORLDS)
def test_nystrom_draws_the_same_columns_whatever_each_rank_seeds(world):
    results = ranks(world)
    assert all(
        np.array_equal(r["nystrom_seeded_per_rank"], results[0]["nystrom_seeded_per_rank"]) for r in results
    )


@pytest.mark.parametrize("world", WORLDS)
def test_a_ddp_module_gives_the_full_batch_answer(world):
    results = ranks(world)
    expected = module_result(0, 1, wrap=False)
    for r in results:
        assert rel(r["ddp"], expected) < 1e-9


@pytest.mark.parametrize("world", WORLDS)
def test_mismatched_hparams_raise_on_every_rank(world):
    for r in ranks(world):
        kind, message = r["hparams_differ"]
        assert kind == "ValueError" and "values of hparams" in message and "rank(s) 1" in message


@pytest.mark.parametrize("world", WORLDS)
def test_a_closure_that_raises_on_one_rank_stops_every_rank(world):
    results = ranks(world)
    assert results[1]["closure_raises"][0] == "KeyError"
    for rank, r in enumerate(results):
        if rank != 1:
            assert r["closure_raises"][0] == "PeerError" and "rank(s) 1" in r["closure_raises"][1]


@pytest.mark.parametrize("world", WORLDS)
def test_nan_on_one_rank_raises_on_every_rank(world):
    kinds = {r["nan_on_one_rank"][0] for r in ranks(world)}
    assert kinds <= {"NonFiniteError", "PeerError"} and "NonFiniteError" in kinds


@pytest.mark.parametrize("world", WORLDS)
def test_strict_breakdowns_and_unused_params_raise_on_every_rank(world):
    for r in ranks(world):
        assert r["strict"][0] == "SolverBreakdownError"
        assert r["params_unused"][0] == "ValueError" and "does not depend on params" in r["params_unused"][1]


@pytest.mark.parametrize("world", WORLDS)
def test_the_group_works_again_after_the_failed_calls(world):
    results = ranks(world)
    expected = single()["implicit-cg"].numpy()
    for r in results:
        assert rel(r["after_failures"], expected) < 1e-6  # iters=50


def ddp_on_one_rank(rank: int, world: int) -> tuple[str, bool]:
    """On a one-process group: a DDP module without distributed=... is refused; with False and
    with True (W = 1) it gives the same answer."""
    net = nn.parallel.DistributedDataParallel(Net())
    inner, outer = module_losses(*data())
    log_decay = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    refused = outcome(lambda: bilevel.HyperGradient("unroll", steps=2).compute(inner, outer, net, log_decay))
    local = bilevel.HyperGradient("unroll", steps=2, distributed=False).compute(inner, outer, net, log_decay)
    one = bilevel.HyperGradient("unroll", steps=2, distributed=True).compute(inner, outer, net, log_decay)
    return refused[1], bool(torch.allclose(local, one, rtol=1e-12, atol=0))


def test_a_ddp_module_without_distributed_is_refused():
    # in a process of its own: a DDP module freed after its process group can hang the
    # interpreter (gloo joins a thread), which the harness's timeout turns into a failure
    message, same = run_ranks(ddp_on_one_rank, 1, timeout=60)[0]
    assert "distributed=True" in message and same


def test_local_solves_needs_distributed():
    with pytest.raises(ValueError, match="distributed=True"):
        bilevel.HyperGradient("implicit-cg", local_solves=True)


@pytest.mark.parametrize("world", WORLDS)
def test_an_implicit_mode_on_a_ddp_module_with_fewer_hparams_than_params(world):
    expected = module_result(0, 1, False, "implicit-minres", tol=1e-13)
    for r in ranks(world):
        assert rel(r["ddp_cg"], expected) < 1e-9


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode, options", CONDITION_MODES)
def test_a_fixed_point_condition_averages_the_ranks_maps(world, mode, options):
    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    (inner, outer), w, log_decay = start()
    expected = bilevel.HyperGradient(mode, **options).compute(
        fixed_point(inner), outer, initial(mode, w), log_decay
    )
    for r in ranks(world):
        assert rel(r[f"fixed_point {mode}"], expected.numpy()) < 1e-9


@pytest.mark.parametrize("world", WORLDS)
def test_compile_runs_eagerly_with_a_warning(world):
    for r in ranks(world):
        assert rel(r["compiled"], single()["implicit-cg"].numpy()) < 1e-9
        assert any("eager path" in m and "distributed" in m for m in r["compile_warnings"])


@pytest.mark.parametrize("world", WORLDS)
def test_uneven_shards_weighted_by_shard_weight_give_the_global_answer(world):
    # the decay term is inside the weighted mean too: Σ_r weight_r · decay / W = decay
    expected = single()["implicit-cg"].numpy()
    for r in ranks(world):
        assert rel(r["uneven"], expected) < 1e-9


@pytest.mark.parametrize("world", WORLDS)
def test_a_call_without_the_option_in_a_process_group_warns_and_stays_local(world):
    results = ranks(world)
    for rank, r in enumerate(results):
        assert any(f"process group of {world} ranks" in m for m in r["unsaid_warnings"])
        (inner, outer), w, log_decay = start(rank, world)
        own = bilevel.HyperGradient("implicit-cg", iters=200, tol=1e-13).compute(inner, outer, w, log_decay)
        assert rel(r["unsaid"], own.numpy()) < 1e-12


@pytest.mark.parametrize("world", WORLDS)
def test_a_keyboard_interrupt_on_one_rank_stops_the_others_too(world):
    results = ranks(world)
    assert results[0]["interrupt"][0] == "KeyboardInterrupt"
    assert all(r["interrupt"][0] == "PeerError" for r in results[1:])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode", ["implicit-cg", "unroll"])
def test_a_term_that_only_one_rank_has_is_averaged_like_the_rest(world, mode):
    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    (inner, outer), w, log_decay = start()
    options = {"iters": 200, "tol": 1e-13} if mode == "implicit-cg" else {"steps": 4}
    terms = (lambda a, b: inner(a, b) + 0.3 * (b**2).sum(), lambda a, b: outer(a, b) + 0.3 * (b**2).sum())
    expected = bilevel.HyperGradient(mode, **options).compute(*terms, initial(mode, w), log_decay)
    for r in ranks(world):
        assert rel(r[f"rank_0_term {mode}"], expected.numpy()) < 1e-9


@pytest.mark.slow
def test_a_rank_outside_a_subgroup_is_told_and_the_members_do_not_wait_for_it():
    results = ranks(3)
    assert results[2]["subgroup"][0] == "ValueError" and "not a member" in results[2]["subgroup"][1]
    assert results[0]["subgroup"][0] == "ok" and results[0]["subgroup"] == results[1]["subgroup"]
