"""The torchopt and higher internals that bilevel/_src/compat.py relies on, checked against the
installed versions: a release that changes one fails here, naming the version and the internal,
instead of silently changing the unrolled modes' hypergradients."""

import importlib.metadata

import higher.optim
import pytest
import torch
import torchopt

from bilevel._src.compat import (
    higher_initial_state,
    higher_step,
    higher_supported_optimizers,
    set_first_call,
    torchopt_counts_as_float64,
)

TORCHOPT = f"torchopt {importlib.metadata.version('torchopt')}"
HIGHER = f"higher {importlib.metadata.version('higher')}"


def _closure_names(function, seen=None):
    """(name, content) of every closure cell reachable from ``function``, as compat walks them."""
    seen = set() if seen is None else seen
    if id(function) in seen:
        return []
    seen.add(id(function))
    if isinstance(function, (tuple, list)):
        return [pair for item in function for pair in _closure_names(item, seen)]
    code, cells = getattr(function, "__code__", None), getattr(function, "__closure__", None) or ()
    found = []
    for name, cell in zip(code.co_freevars if code else (), cells):
        try:
            content = cell.cell_contents
        except ValueError:
            continue
        found.append((name, content))
        if callable(content) or isinstance(content, (tuple, list)):
            found += _closure_names(content, seen)
    return found


# ---------------------------------------------------------------------------------- torchopt
def test_torchopt_momentum_keeps_a_first_call_flag_in_its_update_closure():
    cells = _closure_names(torchopt.sgd(lr=1.0, momentum=0.9).update)
    flags = [content for name, content in cells if name == "first_call"]
    assert flags and all(isinstance(f, bool) for f in flags), (
        f"{TORCHOPT}: torchopt.sgd(momentum=0.9).update no longer closes over a `first_call` bool "
        f"(torchopt.transform.trace); compat.set_first_call cannot reset the first-update rule. "
        f"Closure cells found: {sorted({name for name, _ in cells})}"
    )


def test_patching_first_call_switches_torchopt_first_update_rule():
    # first update b ← g (no dampening), later b ← μ·b + (1 − d)·g: from b = 0, (1 − d)·g
    transform = torchopt.sgd(lr=1.0, momentum=0.9, dampening=0.5)
    params, grads = (torch.zeros(2, dtype=torch.float64),), (torch.ones(2, dtype=torch.float64),)

    def first_update():
        updates, _ = transform.update(grads, transform.init(params), params=params, inplace=False)
        return updates[0]

    fresh = first_update()
    assert torch.equal(fresh, -grads[0]), f"{TORCHOPT}: torchopt.sgd's first momentum update is not b = g"
    after = first_update()  # the closure's flag is now False: the later rule on a zero buffer
    assert torch.equal(after, -0.5 * grads[0]), (
        f"{TORCHOPT}: torchopt.sgd's first_call flag no longer changes after the first update"
    )
    set_first_call(transform.update, True)
    assert torch.equal(first_update(), fresh), (
        f"{TORCHOPT}: setting the `first_call` closure cell to True no longer restores the first-"
        "update rule (torchopt.transform.trace); compat.set_first_call needs another way"
    )
    set_first_call(transform.update, False)
    assert torch.equal(first_update(), after), (
        f"{TORCHOPT}: setting the `first_call` closure cell to False no longer selects the later rule"
    )


@pytest.mark.parametrize("factory", [torchopt.adam, torchopt.adamw])
def test_torchopt_keeps_step_counts_as_int64_tensors(factory):
    params = (torch.zeros(3, dtype=torch.float64),)
    leaves = torchopt.pytree.tree_leaves(factory(lr=0.1).init(params))
    counts = [t for t in leaves if isinstance(t, torch.Tensor) and t.dtype == torch.int64]
    assert counts and all(t.dim() == 0 for t in counts), (
        f"{TORCHOPT}: {factory.__name__}'s state has no 0-dim int64 step count any more (it has "
        f"{[(t.dtype, tuple(t.shape)) for t in leaves if isinstance(t, torch.Tensor)]}); "
        "compat.torchopt_counts_as_float64 casts those counts and needs a review"
    )
    others = [t for t in leaves if isinstance(t, torch.Tensor) and t.dtype != torch.int64]
    assert all(t.dtype == torch.float64 for t in others), f"{TORCHOPT}: moments not in the params' dtype"


def test_float64_counts_keep_adam_in_float64():
    # three Adam steps on g = θ from θ = 1: bias-corrected update −lr·m̂/(√v̂ + eps), in float64
    transform, lr, eps, (b1, b2) = torchopt.adam(lr=0.1, eps=1e-8), 0.1, 1e-8, (0.9, 0.999)
    theta = (torch.ones(1, dtype=torch.float64),)
    state = torchopt_counts_as_float64(transform.init(theta))
    assert all(
        t.dtype != torch.int64 for t in torchopt.pytree.tree_leaves(state) if isinstance(t, torch.Tensor)
    ), f"{TORCHOPT}: an int64 tensor survived the cast"
    m = v = 0.0
    x = 1.0
    for k in range(1, 4):
        updates, state = transform.update(theta, state, params=theta, inplace=False)
        theta = tuple(torchopt.apply_updates(theta, updates, inplace=False))
        m, v = b1 * m + (1 - b1) * x, b2 * v + (1 - b2) * x * x
        x -= lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)) ** 0.5 + eps)
    assert theta[0].dtype == torch.float64
    assert abs(theta[0].item() - x) < 1e-13, (
        f"{TORCHOPT}: Adam with float64 step counts is off float64 accuracy ({theta[0].item()} vs {x}); "
        "the step count or the bias correction changed (compat.torchopt_counts_as_float64)"
    )


def test_torchopt_state_trees_tell_optimizer_settings_apart():
    # check_loaded_state compares the tree structures of a loaded and a fresh optimizer state
    params = (torch.zeros(2),)

    def form(transform):
        return torchopt.pytree.tree_flatten(transform.init(params))[1]

    assert form(torchopt.sgd(lr=0.1, momentum=0.9)) == form(torchopt.sgd(lr=0.2, momentum=0.5))
    assert form(torchopt.sgd(lr=0.1, momentum=0.9)) != form(torchopt.sgd(lr=0.1)), (
        f"{TORCHOPT}: SGD's state with and without momentum has the same tree structure; a checkpoint "
        "of the wrong optimizer would load silently"
    )


# ------------------------------------------------------------------------------------ higher
def test_higher_opt_mapping_maps_torch_optimizers_to_differentiable_classes():
    mapping = getattr(higher.optim, "_opt_mapping", None)
    assert isinstance(mapping, dict), (
        f"{HIGHER}: higher.optim._opt_mapping is gone or not a dict; "
        "compat.higher_supported_optimizers reads the supported optimizers from it"
    )
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.Adagrad, torch.optim.RMSprop):
        assert cls in mapping and issubclass(mapping[cls], higher.optim.DifferentiableOptimizer), (
            f"{HIGHER}: higher.optim._opt_mapping has no differentiable optimizer for {cls.__name__}"
        )
    supported = higher_supported_optimizers()
    assert supported == mapping and supported is not mapping  # a copy: callers cannot edit higher's


def _higher(cls, theta, **kwargs):
    placeholders = [torch.zeros_like(t) for t in theta]
    optimizer = cls(placeholders, **kwargs)
    diffopt = higher.optim.get_diff_optim(optimizer, placeholders, track_higher_grads=False)
    return optimizer, placeholders, diffopt


def test_higher_reads_and_writes_state_by_group_and_param_position():
    theta = (torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True))
    _, _, diffopt = _higher(torch.optim.SGD, theta, lr=0.5, momentum=0.9)
    assert isinstance(diffopt.state, list) and len(diffopt.state) == 1, (
        f"{HIGHER}: DifferentiableOptimizer.state is no longer a list over param groups; "
        "compat.higher_step loads and reads the per-parameter state there"
    )
    buffers = [{"momentum_buffer": torch.full_like(t, 2.0)} for t in theta]
    with torch.enable_grad():
        loss = (theta[0] * theta[0]).sum() / 2 + (theta[1] * theta[1]).sum() / 2  # gradient θ = 1
        new, state = higher_step(diffopt, loss, theta, buffers)
    # b ← μ·b + g = 0.9·2 + 1 = 2.8, θ ← θ − lr·b = 1 − 1.4
    for i, t in enumerate(new):
        assert torch.allclose(t, torch.full_like(t, -0.4)) and torch.allclose(
            state[i]["momentum_buffer"], torch.full_like(t, 2.8)
        ), (
            f"{HIGHER}: a state written to DifferentiableOptimizer.state[0][{i}] was not the one "
            "step() used or updated; compat.higher_step relies on that layout"
        )
    assert buffers[0]["momentum_buffer"][0].item() == 2.0, "higher_step changed the state it was given"


def test_higher_counts_steps_on_the_state_dict_it_is_given():
    theta: tuple[torch.Tensor, ...] = (torch.ones(2, requires_grad=True),)
    optimizer, placeholders, diffopt = _higher(torch.optim.Adagrad, theta, lr=0.1)
    state = higher_initial_state(optimizer, placeholders)
    assert state[0]["step"] == 0.0 and isinstance(state[0]["step"], float)
    assert (
        torch.equal(state[0]["sum"], torch.zeros(2))
        and state[0]["sum"] is not optimizer.state[placeholders[0]]["sum"]
    ), "higher_initial_state must copy torch's tensors"
    for _ in range(2):
        with torch.enable_grad():
            theta, state = higher_step(diffopt, (theta[0] ** 2).sum(), theta, state)
    assert state[0]["step"] == 2.0, (
        f"{HIGHER}: DifferentiableAdagrad no longer counts `state['step']` on the state dict "
        f"(got {state[0]['step']!r}); compat.higher_initial_state passes it as a number for that"
    )
    assert optimizer.state[placeholders[0]]["step"].item() == 0.0, "torch's own state was changed"
