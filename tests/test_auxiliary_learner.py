"""``AuxiliaryLearner``: every registered mode at its defaults, exact resume, the wiring."""

import copy

import pytest
import torch
from torch import nn

import bilevel
from bilevel import HyperGradient
from bilevel.auxiliary import AuxiliaryLearner, LinearCombiner

D = torch.float64


def _per_task_losses(model, batch):
    """(B, 3) cross-entropies: the main task and two auxiliary tasks, one 2-logit head each."""
    xb, yb, ab = batch
    logits = model(xb)
    ce = nn.functional.cross_entropy
    return torch.stack(
        [
            ce(logits[:, 0:2], yb, reduction="none"),
            ce(logits[:, 2:4], ab[:, 0], reduction="none"),
            ce(logits[:, 4:6], ab[:, 1], reduction="none"),
        ],
        1,
    )


def _learner(mode, device="cpu", seed=0, **options):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=D)
    y = (x[:, 0] > 0).long()
    aux_targets = torch.stack([(x[:, 1] > 0), (x[:, 0] + x[:, 1] > 0)], 1).long()
    primary = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 6)).to(device, D)  # 50 parameters
    combiner = LinearCombiner(3, main_skip=True).to(device, D)
    learner = AuxiliaryLearner(
        primary,
        combiner,
        train_loss=lambda p, a, batch: (
            a(_per_task_losses(p, batch)) + 1e-2 * sum((w**2).sum() for w in p.parameters())
        ),
        main_loss=lambda p, batch: nn.functional.cross_entropy(p(batch[0])[:, 0:2], batch[1]),
        primary_optimizer=torch.optim.SGD(primary.parameters(), lr=0.3, momentum=0.9),
        auxiliary_optimizer=torch.optim.Adam(combiner.parameters(), lr=0.05),
        hypergradient=HyperGradient(mode, **options),
        update_every=2,
    )
    batches = [
        tuple(t.to(device) for t in (x[a:b], y[a:b], aux_targets[a:b])) for a, b in ((0, 30), (30, 40))
    ]
    return learner, batches[0], batches[1]


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")  # far from a minimum: CG may warn
@pytest.mark.parametrize("mode", bilevel.available_modes())
def test_learner_runs_with_every_mode_and_resumes_exactly(mode, device):
    learner, train, aux = _learner(mode, device)
    before = learner.auxiliary.raw.detach().clone()
    infos = [learner.step(train, aux) for _ in range(2)]
    assert [i["auxiliary_updated"] for i in infos] == [False, True]
    assert infos[1]["stats"].mode == mode and infos[1]["hypergradient_norm"] > 0
    state = copy.deepcopy(learner.state_dict())
    for _ in range(2):
        learner.step(train, aux)
    after = learner.auxiliary.raw.detach().clone()
    assert not torch.equal(after, before) and torch.isfinite(after).all()

    resumed, _, _ = _learner(mode, device, seed=5)  # other initial weights, overwritten by the state
    resumed.load_state_dict(state)
    assert resumed.steps == 2
    for _ in range(2):
        resumed.step(train, aux)
    assert torch.equal(resumed.auxiliary.raw, learner.auxiliary.raw)
    for a, b in zip(resumed.primary.parameters(), learner.primary.parameters()):
        assert torch.equal(a, b)


def test_learner_hypergradient_is_the_modes_on_the_right_batches():
    """The auxiliary step uses train_batch in the inner loss and aux_batch in the main loss, at
    the primary parameters after that call's primary step, and leaves the primary .grad alone."""
    learner, train, aux = _learner("implicit-exact")
    seen = {}
    primary_step, auxiliary_step = learner.primary_optimizer.step, learner.auxiliary_optimizer.step

    def record_primary(*args, **kwargs):
        seen["primary_grads"] = [p.grad.clone() for p in learner.primary.parameters()]
        return primary_step(*args, **kwargs)

    def record_auxiliary(*args, **kwargs):
        seen["written"] = learner.auxiliary.raw.grad.clone()
        seen["expected"] = HyperGradient("implicit-exact").compute(
            lambda p, a: learner.train_loss(p, a, train),
            lambda p, a: learner.main_loss(p, aux),
            learner.primary,
            learner.auxiliary,
        )["raw"]
        return auxiliary_step(*args, **kwargs)

    learner.primary_optimizer.step, learner.auxiliary_optimizer.step = record_primary, record_auxiliary
    learner.step(train, aux)
    assert "written" not in seen
    info = learner.step(train, aux)
    assert torch.allclose(seen["written"], seen["expected"], rtol=1e-12, atol=1e-15)
    assert info["hypergradient_norm"] == pytest.approx(float(seen["expected"].norm()), rel=1e-12)
    assert all(torch.equal(g, p.grad) for g, p in zip(seen["primary_grads"], learner.primary.parameters()))


def test_learner_feeds_inner_batches_to_unrolled_modes():
    learner, train, aux = _learner("unroll")
    learner.hypergradient = HyperGradient("unroll", steps=3, inner_batches=[aux, train])
    seen = []
    original = learner.train_loss
    learner.train_loss = lambda p, a, batch: seen.append(batch[0].shape[0]) or original(p, a, batch)
    learner.update_every = 1
    learner.step(train, aux)
    assert seen == [30, 10, 30, 10]  # the primary step on train_batch, then the mode's own batches


def test_learner_validates_arguments():
    learner, _, _ = _learner("implicit-cg")
    args = (
        learner.primary,
        learner.auxiliary,
        learner.train_loss,
        learner.main_loss,
        learner.primary_optimizer,
        learner.auxiliary_optimizer,
    )
    with pytest.raises(ValueError, match="update_every"):
        AuxiliaryLearner(*args, update_every=0)
    with pytest.raises(TypeError, match="hypergradient must be a bilevel.HyperGradient"):
        AuxiliaryLearner(*args, hypergradient="implicit-cg")
    with pytest.raises(TypeError, match="auxiliary must be an nn.Module"):
        AuxiliaryLearner(learner.primary, torch.zeros(3), *args[2:])
    with pytest.raises(ValueError, match="missing"):
        learner.load_state_dict({"steps": 3})


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")
@pytest.mark.parametrize(
    "mode, options",
    [
        ("implicit-cg", {"warm_start": True, "damping": 0.5}),
        ("unroll", {"steps": 3, "momentum": 0.9, "update_params": True}),
    ],
)
def test_learner_resumes_the_modes_own_state(mode, options):
    """A mode with state (CG's warm start, an online unroll's optimizer state): the state is part
    of state_dict(), and a resumed run needs it to continue bit for bit."""
    learner, train, aux = _learner(mode, **options)
    for _ in range(2):
        learner.step(train, aux)
    state = copy.deepcopy(learner.state_dict())
    assert state["hypergradient"]["state"]  # the mode's state is saved
    for _ in range(2):
        learner.step(train, aux)
    resumed, _, _ = _learner(mode, seed=5, **options)
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step(train, aux)
    assert torch.equal(resumed.auxiliary.raw, learner.auxiliary.raw)
    assert all(torch.equal(a, b) for a, b in zip(resumed.primary.parameters(), learner.primary.parameters()))
    stateless, _, _ = _learner(mode, seed=5, **options)  # the same, without the mode's state
    state["hypergradient"]["state"] = {}
    stateless.load_state_dict(state)
    for _ in range(2):
        stateless.step(train, aux)
    assert not torch.equal(stateless.auxiliary.raw, learner.auxiliary.raw)


class _WithSpareHead(nn.Module):
    """The learner's primary network plus a head the training loss never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 6))
        self.spare = nn.Linear(4, 1)

    def forward(self, x):
        return self.body(x)


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")  # far from a minimum: CG may warn
@pytest.mark.parametrize("mode", ["implicit-exact", "implicit-cg", "unroll"])
def test_learner_holds_primary_parameters_the_training_loss_does_not_use_fixed(mode):
    """An unused head is a constant of the inner problem (implicit modes would otherwise
    refuse a singular Hessian): the auxiliary step equals that of the same model with the head
    frozen throughout, even though main_loss reads the head, and the head stays trainable."""
    learners = []
    # far from a minimum the Hessian is indefinite: damping keeps CG's answer away from x = 0
    options = {"damping": 1.0} if mode == "implicit-cg" else {}
    for frozen in (False, True):
        learner, train, aux = _learner(mode, **options)
        torch.manual_seed(1)
        primary = _WithSpareHead().to(D)
        primary.spare.requires_grad_(not frozen)
        learner.primary = primary
        learner.primary_optimizer = torch.optim.SGD(primary.parameters(), lr=0.3)
        learner.train_loss = lambda p, a, batch: (
            a(_per_task_losses(p, batch)) + 1e-2 * sum((w**2).sum() for w in p.body.parameters())
        )
        learner.main_loss = lambda p, batch: (
            nn.functional.cross_entropy(p(batch[0])[:, 0:2], batch[1]) + p.spare(batch[0]).pow(2).mean()
        )
        for _ in range(2):
            info = learner.step(train, aux)
        learners.append((learner, info))
    (learner, info), (reference, reference_info) = learners
    assert info["auxiliary_updated"] and info["hypergradient_norm"] > 0
    assert info["hypergradient_norm"] == pytest.approx(reference_info["hypergradient_norm"], rel=1e-12)
    assert torch.allclose(learner.auxiliary.raw, reference.auxiliary.raw, rtol=1e-12, atol=1e-15)
    assert all(p.requires_grad for p in learner.primary.parameters())
    assert learner.primary.spare.weight.grad is None


def _sometimes_unused_head(hypergradient):
    """A head that train_loss uses only on batches that carry its labels."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, dtype=D), torch.randn(20, 2, dtype=D)
    primary = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)}).to(D)
    weight = nn.Linear(1, 1, bias=False).to(D)

    def train_loss(p, w, batch):
        x, y, labelled = batch
        loss = ((p["a"](x)[:, 0] - y[:, 0]) ** 2).mean() * w.weight.exp().sum()
        return loss + ((p["b"](x)[:, 0] - y[:, 1]) ** 2).mean() if labelled else loss

    learner = AuxiliaryLearner(
        primary,
        weight,
        train_loss,
        lambda p, b: ((p["a"](b[0])[:, 0] - b[1][:, 0]) ** 2).mean(),
        torch.optim.SGD(primary.parameters(), lr=0.1),
        torch.optim.SGD(weight.parameters(), lr=0.1),
        hypergradient,
        update_every=1,
    )
    return learner, (x, y, True), (x, y, False), (x, y)


@pytest.mark.filterwarnings("ignore::bilevel.HypergradientWarning")
def test_learner_refuses_a_changing_set_of_unused_parameters_only_when_the_mode_carries_state():
    stateful = HyperGradient("unroll", steps=2, update_params=True, lr=0.05, momentum=0.9)
    learner, labelled, unlabelled, aux = _sometimes_unused_head(stateful)
    learner.step(labelled, aux)
    before = copy.deepcopy(learner.state_dict())
    with pytest.raises(ValueError, match=r"unused now: \['b.weight', 'b.bias'\]; then: none.*update_params"):
        learner.step(unlabelled, aux)
    after = learner.state_dict()  # refused before anything moved
    assert after["steps"] == before["steps"] == 1
    assert all(torch.equal(after["primary"][k], v) for k, v in before["primary"].items())
    learner.step(labelled, aux)  # the same parameters as last time: fine
    stateless, labelled, unlabelled, aux = _sometimes_unused_head(HyperGradient("unroll", steps=2, lr=0.05))
    for batch in (labelled, unlabelled, labelled):
        assert stateless.step(batch, aux)["auxiliary_updated"]


def test_learner_load_refused_leaves_the_learner_as_it_was():
    saver, labelled, _, aux = _sometimes_unused_head(
        HyperGradient("unroll", steps=2, update_params=True, lr=0.05, momentum=0.9)
    )
    saver.step(labelled, aux)
    checkpoint = copy.deepcopy(saver.state_dict())
    loader, labelled, _, aux = _sometimes_unused_head(
        HyperGradient("unroll", steps=2, update_params=True, lr=0.05, inner_optimizer=torch.optim.Adam)
    )
    torch.manual_seed(3)
    for p in loader.primary.parameters():
        p.data.normal_()
    before = copy.deepcopy(loader.state_dict())
    with pytest.raises(ValueError, match="inner_optimizer 'SGD' there, 'Adam' here"):
        loader.load_state_dict(checkpoint)
    after = loader.state_dict()
    assert after["steps"] == before["steps"] == 0
    assert all(torch.equal(after["primary"][k], v) for k, v in before["primary"].items())
    assert not torch.equal(after["primary"]["a.weight"], checkpoint["primary"]["a.weight"])
    # a part refused after the mode's state was loaded: that state is rolled back too
    same, labelled, _, aux = _sometimes_unused_head(
        HyperGradient("unroll", steps=2, update_params=True, lr=0.05, momentum=0.9)
    )
    broken = copy.deepcopy(checkpoint)
    del broken["primary"]["b.bias"]
    with pytest.raises(RuntimeError, match="b.bias"):
        same.load_state_dict(broken)
    assert same.steps == 0 and same.hypergradient.state_dict()["state"] == {}
