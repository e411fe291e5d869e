"""``AuxiliaryLearner`` with a DDP primary and ``distributed=True``: W gloo processes, one
process's models.

Every rank holds 1/W of each global batch; its closures return means over its rows. One spawn
per world size runs every scenario of this module under a hard timeout; the tests compare the
ranks' models with each other (bit for bit) and with one process that holds all the rows.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings

import numpy as np
import pytest
import torch
from parallel import outcome, rel, run_ranks
from torch import nn

import bilevel
from bilevel.auxiliary import AuxiliaryLearner

D = torch.float64
N, N_AUX, P, STEPS = 12, 6, 4, 4  # rows divisible by 2 and 3


def data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Four global training batches and the auxiliary (main-task) batch."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(P, generator=g, dtype=D)

    def batch(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(rows, P, generator=g, dtype=D)
        return x, torch.tanh(x @ w) + 0.1 * torch.randn(rows, generator=g, dtype=D)

    return [batch(N) for _ in range(STEPS)], batch(N_AUX)


class Primary(nn.Module):
    """A tiny regression MLP, and a head that no loss uses (it must never get a gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(P, 3), nn.Tanh(), nn.Linear(3, 1))
        self.spare = nn.Linear(P, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


def train_loss(primary, auxiliary, batch, scale=None):
    """Per-row squared errors weighted by the auxiliary net: their mean over the batch (or
    their sum times ``scale``, a rank's weight for uneven shards), plus weight decay."""
    x, y = batch
    weights = 2 * torch.sigmoid(auxiliary(x)).squeeze(-1)
    errors = weights * (primary(x) - y) ** 2
    data_term = errors.mean() if scale is None else errors.sum() * scale
    return data_term + 1e-2 * sum((p**2).sum() for p in primary.body.parameters())


def main_loss(primary, batch, scale=None):
    x, y = batch
    errors = (primary(x) - y) ** 2
    return errors.mean() if scale is None else errors.sum() * scale


def build(seed: int = 0, wrap: bool = False, **options) -> AuxiliaryLearner:
    """The learner on one process (``wrap``: a DDP primary and distributed=True)."""
    torch.manual_seed(seed)
    primary: nn.Module = Primary().to(D)
    auxiliary = nn.Linear(P, 1).to(D)
    if wrap:
        primary = nn.parallel.DistributedDataParallel(primary)
    return AuxiliaryLearner(
        primary,
        auxiliary,
        train_loss,
        main_loss,
        torch.optim.SGD(primary.parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(auxiliary.parameters(), lr=0.05),
        bilevel.HyperGradient("implicit-exact", distributed=True if wrap else None),
        update_every=2,
        **options,
    )


def flat(learner: AuxiliaryLearner) -> np.ndarray:
    """Every primary and auxiliary parameter, in one vector."""
    primary = getattr(learner.primary, "module", learner.primary)
    tensors = [*primary.parameters(), *learner.auxiliary.parameters()]
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().copy()


def snapshot(learner: AuxiliaryLearner) -> list:
    """All a step could change: models, optimizers, .grad fields, counters, mode state."""
    leaves = torch.utils._pytree.tree_leaves(learner.state_dict())
    grads = [p.grad for m in (learner.primary, learner.auxiliary) for p in m.parameters()]
    return [x.clone() if isinstance(x, torch.Tensor) else copy.deepcopy(x) for x in leaves + grads]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b)
    )


def split(tensors, sizes: list[int], rank: int):
    return tuple(t.split(sizes)[rank] for t in tensors)


def uneven(rows: int, world: int) -> list[int]:
    """Row counts of W uneven shards (W = 2: 7 and 5 of 12; W = 3: 6, 3, 3)."""
    small = rows // world - 1
    return [rows - small * (world - 1)] + [small] * (world - 1)


def refused(learner: AuxiliaryLearner, call) -> tuple[str, str, bool]:
    """(exception class, message, whether nothing moved)."""
    before = snapshot(learner)
    kind, message = outcome(call)
    return kind, message, same(before, snapshot(learner))


def checkpoint_bytes(learner: AuxiliaryLearner) -> bytes:
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    return buffer.getvalue()


def scenario(rank: int, world: int) -> dict:
    """Everything a rank reports (see the tests)."""
    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    batches, aux = data()
    shards = [tuple(t.chunk(world)[rank] for t in b) for b in batches]
    aux_shard = tuple(t.chunk(world)[rank] for t in aux)
    report: dict = {}

    learner = build(wrap=True)
    infos = []
    for i, batch in enumerate(shards):
        infos.append(learner.step(batch, aux_shard))
        if i == 1:
            report["checkpoint"] = checkpoint_bytes(learner)
            state = copy.deepcopy(learner.state_dict())
    report["final"] = flat(learner)
    report["losses"] = [i["train_loss"] for i in infos]
    report["updated"] = [i["auxiliary_updated"] for i in infos]
    report["spare_grad"] = learner.primary.module.spare.weight.grad is not None
    report["keys"] = sorted(state["primary"])

    resumed = build(seed=5, wrap=True)  # other weights, overwritten by the checkpoint
    resumed.load_state_dict(state)
    for batch in shards[2:]:
        resumed.step(batch, aux_shard)
    report["resumed"] = flat(resumed)

    single = build()  # a one-process (unwrapped) checkpoint, resumed on the ranks
    for batch in batches[:2]:
        single.step(batch, aux)
    into_ddp = build(seed=5, wrap=True)
    into_ddp.load_state_dict(copy.deepcopy(single.state_dict()))
    for batch in shards[2:]:
        into_ddp.step(batch, aux_shard)
    report["into_ddp"] = flat(into_ddp)

    # refusals and a peer's error, each before anything moves; then the run goes on as usual
    robust = build(wrap=True)
    robust.step(shards[0], aux_shard)
    sizes, aux_sizes = uneven(N, world), uneven(N_AUX, world)
    report["uneven_train"] = refused(robust, lambda: robust.step(split(batches[1], sizes, rank), aux_shard))
    report["uneven_aux"] = refused(robust, lambda: robust.step(shards[1], split(aux, aux_sizes, rank)))

    def failing(primary, auxiliary, batch):
        if rank == 1:
            raise KeyError("a bad batch on rank 1")
        return train_loss(primary, auxiliary, batch)

    robust.train_loss = failing
    report["raises"] = refused(robust, lambda: robust.step(shards[1], aux_shard))
    robust.train_loss = train_loss
    for batch in shards[1:]:
        robust.step(batch, aux_shard)
    report["robust"] = flat(robust)

    # closures that weight their uneven shards themselves: shard_sum * W / N_global
    weighted = build(wrap=True, check_shards=False)
    weighted.train_loss = lambda p, a, b: train_loss(p, a, b, scale=world / N)
    weighted.main_loss = lambda p, b: main_loss(p, b, scale=world / N_AUX)
    for batch in batches:
        weighted.step(split(batch, sizes, rank), split(aux, aux_sizes, rank))
    report["weighted"] = flat(weighted)

    skewed = build(wrap=True)  # ranks resumed from different checkpoints
    skewed.steps = rank
    report["steps_differ"] = refused(skewed, lambda: skewed.step(shards[0], aux_shard))

    undeclared = build(wrap=True)  # a DDP primary whose HyperGradient has no distributed=...
    undeclared.hypergradient = bilevel.HyperGradient("implicit-exact")
    report["undeclared"] = refused(undeclared, lambda: undeclared.step(shards[0], aux_shard))
    return report


@functools.lru_cache
def ranks(world: int) -> tuple:
    return tuple(run_ranks(scenario, world, timeout=90))


@functools.lru_cache
def reference() -> dict:
    """One process on the global batches: the final models and the losses."""
    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    batches, aux = data()
    learner = build()
    infos = [learner.step(batch, aux) for batch in batches]
    return {"final": flat(learner), "losses": [i["train_loss"] for i in infos]}


WORLDS = [2, pytest.param(3, marks=pytest.mark.slow)]


@pytest.mark.parametrize("world", WORLDS)
def test_ranks_keep_identical_models_equal_to_one_process(world):
    results = ranks(world)
    expected = reference()
    assert rel(results[0]["final"], expected["final"]) < 1e-9
    assert rel(results[0]["final"], flat(build())) > 1e-3  # the models did move
    assert np.allclose(results[0]["losses"], expected["losses"], rtol=1e-12, atol=0)  # the global loss
    for r in results:
        assert np.array_equal(r["final"], results[0]["final"])  # bit-identical on every rank
        assert r["losses"] == results[0]["losses"]
        assert r["updated"] == [False, True, False, True]
        assert not r["spare_grad"]  # unused on every rank: no gradient, not a zero one


@pytest.mark.parametrize("world", WORLDS)
def test_a_checkpoint_resumes_into_fresh_ddp_learners(world):
    results = ranks(world)
    for r in results:
        assert all(k.startswith("module.") for k in r["keys"])  # the wrapped module's state
        assert np.array_equal(r["resumed"], r["final"])
        assert rel(r["into_ddp"], reference()["final"]) < 1e-9


@pytest.mark.parametrize("world", WORLDS)
def test_a_ddp_checkpoint_resumes_on_one_process(world):
    state = torch.load(io.BytesIO(ranks(world)[0]["checkpoint"]), weights_only=False)
    batches, aux = data()
    learner = build(seed=5)
    learner.load_state_dict(state)
    assert learner.steps == 2
    for batch in batches[2:]:
        learner.step(batch, aux)
    assert rel(flat(learner), reference()["final"]) < 1e-9


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("which", ["train", "aux"])
def test_uneven_shards_raise_on_every_rank_before_anything_moves(world, which):
    for r in ranks(world):
        kind, message, unchanged = r[f"uneven_{which}"]
        assert kind == "ValueError" and unchanged
        assert f"{which}_batch shards differ in size" in message
        assert "DistributedSampler" in message and "shard_sum * W / N_global" in message


@pytest.mark.parametrize("world", WORLDS)
def test_a_train_loss_that_raises_on_one_rank_stops_every_rank(world):
    results = ranks(world)
    for rank, r in enumerate(results):
        kind, message, unchanged = r["raises"]
        assert unchanged
        if rank == 1:
            assert kind == "KeyError" and "rank 1" in message
        else:
            assert kind == "PeerError" and "rank(s) 1" in message
    for r in results:  # and the run went on, in step on every rank, to the same models
        assert np.array_equal(r["robust"], results[0]["final"])


@pytest.mark.parametrize("world", WORLDS)
def test_closures_that_weight_uneven_shards_may_skip_the_check(world):
    for r in ranks(world):
        assert rel(r["weighted"], reference()["final"]) < 1e-9


@pytest.mark.parametrize("world", WORLDS)
def test_a_ddp_primary_without_distributed_is_refused_before_the_first_step(world):
    for r in ranks(world):
        kind, message, unchanged = r["undeclared"]
        assert kind == "ValueError" and "distributed=True" in message and unchanged


@pytest.mark.parametrize("world", WORLDS)
def test_learners_at_different_steps_raise_on_every_rank_before_anything_moves(world):
    for r in ranks(world):
        kind, message, unchanged = r["steps_differ"]
        assert kind == "ValueError" and unchanged and "different steps" in message and "rank 1: 1" in message
