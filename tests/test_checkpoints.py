"""Checkpoints: those written by bilevel 0.1.0 (``tests/data``, made by
``tests/data/make_checkpoints.py`` with that version) resume here, the current format
round-trips through ``torch.save``, and a loaded layout still binds the next call."""

import collections
import copy
from pathlib import Path

import pytest
import torch

from bilevel import HyperGradient

from problems import load_script, roundtrip

DATA = Path(__file__).resolve().parent / "data"
made = load_script(DATA / "make_checkpoints.py")  # the problems the 0.1.0 checkpoints were computed for

EXPECTED = torch.load(DATA / "expected_0.1.0.pt", weights_only=True)
CLOSE = {"rtol": 1e-9, "atol": 1e-13}  # the next call of 0.1.0 within solver round-off


def _load(name, weights_only=True):
    return torch.load(DATA / name, weights_only=weights_only)


def test_the_stored_checkpoints_are_those_of_0_1_0():
    assert EXPECTED["version"] == "0.1.0"
    for name in ("implicit_cg_warm_start_0.1.0.pt", "implicit_nystrom_0.1.0.pt"):
        assert "format" not in _load(name)  # 0.1.0 wrote none
    assert "format" not in _load("unroll_momentum_0.1.0.pt", weights_only=False)


def test_a_0_1_0_implicit_cg_checkpoint_warm_starts_the_next_call():
    checkpoint = _load("implicit_cg_warm_start_0.1.0.pt")
    hg = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    hg.load_state_dict(checkpoint)
    got = hg.compute(*made.cg_problem(1))  # the layout of a dict holding a module compares equal
    expected = EXPECTED["implicit-cg"]
    assert isinstance(got, tuple) and len(got) == 2
    for a, b in zip(got, expected["next"]):
        torch.testing.assert_close(a, b, **CLOSE)
    cold = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    cold.compute(*made.cg_problem(1))
    # the loaded start was used: 0.1.0's count (a product for the start's residual; one more now
    # for the true residual), not a cold start's
    assert hg.stats.hvps == expected["hvps"] + 1 != cold.stats.hvps
    assert hg.state_dict()["format"] == 2


def test_a_0_1_0_unroll_checkpoint_resumes_the_momentum():
    checkpoint = _load("unroll_momentum_0.1.0.pt", weights_only=False)  # torchopt's named tuples
    expected = EXPECTED["unroll"]
    inner, outer, _, lam = made.unroll_problem()
    theta = expected["theta"].clone().requires_grad_()
    hg = HyperGradient("unroll", **made.UNROLL_OPTIONS)
    hg.load_state_dict(checkpoint)
    torch.testing.assert_close(hg.compute(inner, outer, theta, lam), expected["next"], **CLOSE)
    torch.testing.assert_close(theta.detach(), expected["theta_after"], **CLOSE)
    # the check can fail: without the momentum the call gives other numbers
    cold_theta = expected["theta"].clone().requires_grad_()
    cold = HyperGradient("unroll", **made.UNROLL_OPTIONS).compute(inner, outer, cold_theta, lam)
    assert not torch.allclose(cold, expected["next"], **CLOSE)


def test_a_0_1_0_nystrom_checkpoint_resumes_the_generator():
    """The loaded generator draws 0.1.0's next columns (``sketch="columns"``, 0.1.0's sketch).
    The solve itself changed since (ρ applies only outside the sketch), so the next call is
    compared with one from a generator set to the checkpoint's state, not 0.1.0's number."""
    checkpoint = _load("implicit_nystrom_0.1.0.pt")
    options = dict(made.NYSTROM_OPTIONS, sketch="columns")
    hg = HyperGradient("implicit-nystrom", **dict(options, generator=11))
    hg.load_state_dict(checkpoint)
    resumed = hg.compute(*made.nystrom_problem(1))
    generator = torch.Generator()
    generator.set_state(checkpoint["state"]["generator"])
    same = HyperGradient("implicit-nystrom", **dict(options, generator=generator))
    torch.testing.assert_close(resumed, same.compute(*made.nystrom_problem(1)), rtol=0, atol=0)
    fresh = HyperGradient("implicit-nystrom", **options)
    assert not torch.allclose(fresh.compute(*made.nystrom_problem(1)), resumed, **CLOSE)


def test_a_checkpoint_of_mode_and_state_only_loads():
    """The form written before checkpoints recorded the configuration and layout."""
    checkpoint = _load("implicit_cg_warm_start_0.1.0.pt")
    hg = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    hg.load_state_dict({"mode": checkpoint["mode"], "state": checkpoint["state"]})
    for a, b in zip(hg.compute(*made.cg_problem(1)), EXPECTED["implicit-cg"]["next"]):
        torch.testing.assert_close(a, b, **CLOSE)


def test_a_layout_change_after_loading_a_0_1_0_checkpoint_is_refused():
    checkpoint = _load("implicit_cg_warm_start_0.1.0.pt")
    inner, outer, params, hparams = made.cg_problem(1)
    hg = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    hg.load_state_dict(checkpoint)
    message = (
        r"changed structure, shapes or dtype since the loaded checkpoint \(params was "
        r"\{'linear': Linear\(1 parameters\), 'offset': tensor\}, now \[Linear\(1 parameters\), "
        r"tensor\]\).*new HyperGradient"
    )
    with pytest.raises(ValueError, match=message):
        hg.compute(
            lambda p, h: inner(dict(zip(params, p)), h),
            lambda p, h: outer(dict(zip(params, p)), h),
            list(params.values()),
            hparams,
        )
    hg = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    hg.load_state_dict(checkpoint)
    with pytest.raises(ValueError, match=r"since the loaded checkpoint \(dtype was float64, now float32\)"):
        hg.compute(
            inner,
            outer,
            {
                "linear": params["linear"].float(),
                "offset": params["offset"].detach().float().requires_grad_(),
            },
            tuple(h.detach().float().requires_grad_() for h in hparams),
        )


def _drifting(step):
    """A warm-started problem with a named tuple of hparams and an OrderedDict of params."""
    inner, outer, params, (lam_w, lam_o) = made.cg_problem(step)
    Penalties = collections.namedtuple("Penalties", "weights offset")
    ordered = collections.OrderedDict(params)
    return (
        (lambda p, h: inner(p, tuple(h))),
        (lambda p, h: outer(p, tuple(h))),
        ordered,
        Penalties(lam_w, lam_o),
    )


def test_the_current_format_round_trips_with_other_containers():
    hg = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    first = hg.compute(*_drifting(0))
    assert type(first).__name__ == "Penalties" and first.weights.shape == (4,)
    checkpoint = roundtrip(hg.state_dict())  # weights_only: the layout is plain data
    assert checkpoint["format"] == 2
    assert checkpoint["layout"]["hparams_described"] == "Penalties(weights=tensor, offset=tensor)"
    expected = hg.compute(*_drifting(1))
    resumed = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    resumed.load_state_dict(checkpoint)
    got = resumed.compute(*_drifting(1))
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and resumed.stats.hvps == hg.stats.hvps
    with pytest.raises(
        ValueError,
        match=r"hparams was Penalties\(weights=tensor, offset=tensor\), "
        r"now \(tensor, tensor\)",
    ):
        loaded = HyperGradient("implicit-cg", **made.CG_OPTIONS)
        loaded.load_state_dict(checkpoint)
        loaded.compute(*made.cg_problem(1))


def test_a_layout_with_lists_for_tuples_still_matches():
    """A checkpoint passed through a serializer without tuples (JSON, YAML)."""

    def lists(value):
        return [lists(v) for v in value] if isinstance(value, tuple) else value

    checkpoint = copy.deepcopy(_load("implicit_cg_warm_start_0.1.0.pt"))
    checkpoint["layout"] = {k: lists(v) for k, v in checkpoint["layout"].items()}
    hg = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    hg.load_state_dict(checkpoint)
    hg.compute(*made.cg_problem(1))


def test_checkpoints_this_version_cannot_read_are_refused_before_anything_loads():
    hg = HyperGradient("implicit-cg", **made.CG_OPTIONS)
    hg.compute(*made.cg_problem(0))
    before = copy.deepcopy(hg.state_dict())
    newer = dict(before, format=3)
    with pytest.raises(ValueError, match="format 3, written by a newer version of bilevel"):
        hg.load_state_dict(newer)
    with pytest.raises(ValueError, match="malformed layout"):
        hg.load_state_dict(dict(before, layout={"params": ("tensor", (), ())}))
    with pytest.raises(ValueError, match="expects a dict from HyperGradient.state_dict"):
        hg.load_state_dict([before])
    after = hg.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(after["state"]["previous"], before["state"]["previous"]))
