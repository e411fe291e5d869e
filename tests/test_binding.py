"""Modules evaluated at the library's tensors (bilevel/_src/binding.py): the one walk agrees
with torch's listings, tied weights are bound at every place, a module that lists its members
its own way goes through functional_call, and the user's modules come back untouched."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from bilevel import HyperGradient
from bilevel._src.binding import Binding, module_members
from bilevel._src.problem import BilevelProblem

from problems import maml_reference, sgd_rule


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class TiedAutoencoder(nn.Module):
    """The decoder reuses the encoder's weight (the same Parameter at two places)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.tanh(self.encoder(x)))


class Scaled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * w


def _zoo() -> list[nn.Module]:
    shared = nn.Linear(3, 3)
    no_bias = nn.Linear(3, 3)
    no_bias.register_parameter("bias", None)
    with_buffers = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with_buffers.register_buffer("scratch", torch.zeros(2), persistent=False)
    parametrized = nn.Linear(3, 3)
    parametrize.register_parametrization(parametrized, "weight", Scaled())
    return [
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))),
        nn.Sequential(shared, nn.ReLU(), shared),  # one submodule at two places
        TiedAutoencoder(),
        no_bias,
        with_buffers,
        parametrized,
    ]


@pytest.mark.parametrize("module", _zoo(), ids=lambda m: type(m).__name__)
def test_the_walk_lists_what_torch_lists(module: nn.Module) -> None:
    members = module_members(module)
    assert members is not None
    for kind, ours in (("parameters", members.parameters), ("buffers", members.buffers)):
        listed = list(getattr(module, f"named_{kind}")())
        assert [n for n, _ in listed] == list(ours)
        assert all(t is ours[n][0] for n, t in listed)
    # every place that holds a parameter, aliases included, is recorded exactly once
    everywhere = {(id(m), k) for m in module.modules() for k, p in m._parameters.items() if p is not None}
    recorded = [(id(d), k) for _, places in members.parameters.values() for d, k in places]
    dicts = {id(m._parameters): id(m) for m in module.modules()}
    assert sorted((dicts[d], k) for d, k in recorded) == sorted(everywhere)


def test_a_tied_weight_is_bound_at_both_places() -> None:
    torch.manual_seed(0)
    model = TiedAutoencoder()
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    assert len(module_members(model).parameters["encoder.weight"][1]) == 2  # type: ignore[union-attr]
    inner = lambda m, init: ((m(x) - y) ** 2).mean()
    outer = lambda m, init: ((m(x + 1) - y) ** 2).mean()
    got = HyperGradient("unroll", steps=3, lr=0.1).compute(inner, outer, model, model)

    # by hand: functional_call ties the decoder to the encoder's tensor
    expected = maml_reference(model, (x, y, x + 1, y), sgd_rule, steps=3, lr=0.1)
    assert list(got) == list(expected)
    for name, e in expected.items():
        torch.testing.assert_close(got[name], e, rtol=1e-12, atol=1e-14)


class BiasAsBuffer(nn.Module):
    """The linear layer's bias is also registered as a buffer, and the forward reads both."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("alias", self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.alias


def test_a_parameter_registered_as_a_buffer_too_follows_the_parameter() -> None:
    torch.manual_seed(0)
    model = BiasAsBuffer()
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    inner = lambda m, init: ((m(x) - y) ** 2).mean()
    outer = lambda m, init: ((m(x - 1) - y) ** 2).mean()
    got = HyperGradient("unroll", steps=3, lr=0.1).compute(inner, outer, model, model)
    assert "alias" not in module_members(model).buffers  # type: ignore[union-attr]

    def forward(w: torch.Tensor, b: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ w.T + 2 * b  # the bias read twice

    phi = [model.linear.weight, model.linear.bias]
    theta = phi
    for _ in range(3):
        loss = ((forward(*theta, x) - y) ** 2).mean()
        theta = [t - 0.1 * g for t, g in zip(theta, torch.autograd.grad(loss, theta, create_graph=True))]
    expected = torch.autograd.grad(((forward(*theta, x - 1) - y) ** 2).mean(), phi)
    torch.testing.assert_close(got["linear.weight"], expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["linear.bias"], expected[1], rtol=1e-12, atol=1e-14)
    assert model.alias is model.linear.bias


class OwnListing(nn.Sequential):
    """A class that redefines a listing: the walk cannot vouch for it."""

    def named_parameters(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        yield from super().named_parameters(*args, **kwargs)


def test_a_module_with_its_own_listing_goes_through_functional_call() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1))
    own = OwnListing(*[type(m)(*a) if a else type(m)() for m, a in zip(plain, [(2, 5), (), (5, 1)])])
    own.load_state_dict(plain.state_dict())
    assert module_members(own) is None and module_members(plain) is not None
    x, y = torch.randn(6, 2), torch.randn(6, 1)
    inner = lambda m, init: ((m(x) - y) ** 2).mean()
    outer = lambda m, init: ((m(2 * x) - y) ** 2).mean()
    hg = HyperGradient("unroll", steps=4, lr=0.2)
    problem = BilevelProblem(inner, outer, own, own)
    assert problem._binding is None
    a, b = hg.compute(inner, outer, plain, plain), hg.compute(inner, outer, own, own)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_the_modules_are_restored_also_when_a_closure_raises() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    before = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    x = torch.randn(5, 2)

    def inner(m: nn.Module, init: object) -> torch.Tensor:
        assert m[0].weight is not before[1][1]["weight"]  # bound to the library's tensor
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        HyperGradient("unroll", steps=2).compute(inner, lambda m, i: m(x).sum(), model, model)
    for m, parameters, buffers in before:
        assert m._parameters.keys() == parameters.keys() and m._buffers.keys() == buffers.keys()
        assert all(m._parameters[k] is v for k, v in parameters.items())
        assert all(m._buffers[k] is v for k, v in buffers.items())


def test_a_place_bound_twice_gets_its_original_back() -> None:
    holder = {"w": torch.zeros(1)}
    original = holder["w"]
    binding = Binding([[(holder, "w")], [(holder, "w")]])
    replaced = binding.swap([torch.ones(1), torch.full((1,), 2.0)])
    assert holder["w"].item() == 2.0
    binding.restore(replaced)
    assert holder["w"] is original


class CheckpointedBlock(nn.Module):
    """The second layer runs under non-reentrant activation checkpointing when ``recompute``."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 1)
        self.recompute = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.recompute:
            return checkpoint(self.second, h, use_reentrant=False)
        return self.second(h)


@pytest.mark.parametrize("mode, options", [("unroll", {"steps": 2}), ("implicit-cg", {})])
def test_activation_checkpointing_in_the_model_is_refused(mode: str, options: dict) -> None:
    torch.manual_seed(0)
    model = CheckpointedBlock()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    decay = torch.tensor(0.1, requires_grad=True)
    inner = lambda m, d: ((m(x) - y) ** 2).mean() + d * sum((p**2).sum() for p in m.parameters())
    outer = lambda m, d: ((m(x + 1) - y) ** 2).mean()
    hg = HyperGradient(mode, **options)
    for _ in range(2):  # a refused call does not count as screened
        with pytest.raises(ValueError, match="activation checkpointing"):
            hg.compute(inner, outer, model, decay)
    model.recompute = False
    got = hg.compute(inner, outer, model, decay)
    assert torch.isfinite(got)
    pickle.loads(pickle.dumps(hg))  # what it records of the screened closures pickles
    model.recompute = True  # a new HyperGradient screens its first call again
    with pytest.raises(ValueError, match="activation checkpointing"):
        HyperGradient(mode, **options).compute(inner, outer, model, decay)


def test_a_submodule_at_two_places_gets_its_own_parameters_back() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    weight, bias = shared.weight, shared.bias
    x = torch.randn(4, 3)
    HyperGradient("unroll", steps=2).compute(
        lambda m, i: m(x).pow(2).mean(), lambda m, i: m(x).mean(), model, model
    )
    assert shared.weight is weight and shared.bias is bias
    assert isinstance(shared.weight, nn.Parameter)
