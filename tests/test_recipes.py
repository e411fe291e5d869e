"""The README's recipes run as printed, and each computes what its text says.

Every python block of the "## Recipes" section runs, in order, in a namespace of its own;
its test then checks what the block computed against something the library did not compute
(a hand-written loop, a closed form, finite differences of a plain torch.optim run, labels the
recipe corrupted). The two recipes the section points to, MAML on sine waves under "## Modes"
and the lasso under "## Inner problems that are not one loss's minimum", run from there.
"""

import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from bilevel import HyperGradient, HypergradientWarning

README = (Path(__file__).parent.parent / "README.md").read_text()
D = torch.float64
RECIPES = ["hpo", "unroll_lr_momentum", "maml_lr", "imaml", "hypercleaning", "auxiliary", "testing"]


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README.md has no section '## {title}'"
    return match.group(1)


def _blocks(title: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", _section(title), re.S | re.M)


def _recipe(name: str) -> str:
    return _blocks("Recipes")[RECIPES.index(name)]


def _run(code: str, name: str) -> tuple[dict, list[str]]:
    """exec ``code`` in a fresh namespace; returns it and the HypergradientWarnings it gave.
    The global random state is restored afterwards (each recipe seeds its own)."""
    namespace: dict = {"__name__": f"readme_recipe_{name}"}
    with torch.random.fork_rng(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, f"README.md (recipe {name})", "exec"), namespace)
    return namespace, [str(w.message) for w in caught if issubclass(w.category, HypergradientWarning)]


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: one thread is faster, and much faster on a machine busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_the_section_holds_one_short_complete_block_per_recipe():
    blocks = _blocks("Recipes")
    assert len(blocks) == len(RECIPES), "a recipe was added or removed: update RECIPES and its test"
    for name, code in zip(RECIPES, blocks):
        lines = [line for line in code.splitlines() if line.strip()]
        assert 10 <= len(lines) <= 25, (name, len(lines))
        assert lines[0].startswith("import ") and "print(" in code, name  # runs as is, shows a number
    section = _section("Recipes")
    for anchor in ("(#modes)", "(#inner-problems-that-are-not-one-losss-minimum)"):  # the pointers
        assert anchor in section
    assert "## Modes" in README and "## Inner problems that are not one loss's minimum" in README


def test_hpo_with_a_module_lowers_the_validation_loss_with_correct_hypergradients():
    ns, warned = _run(_recipe("hpo"), "hpo")
    assert not warned, warned
    history, model, log_decay = ns["history"], ns["model"], ns["log_decay"]
    assert len(history) == 15 and history[-1] < 0.8 * history[0], history
    assert float(log_decay["weight"].detach()) > -6.0  # more decay than the start: the data are few and noisy
    # at the final point, the CG hypergradient is the dense solve's
    ns["inner_opt"].step(ns["inner_closure"])
    args = (ns["train_loss"], ns["val_loss"], model, log_decay)
    cg, exact = ns["hg"].compute(*args), HyperGradient("implicit-exact").compute(*args)
    for n in exact:
        assert abs(float(cg[n] - exact[n])) <= 1e-6 * abs(float(exact[n])) + 1e-12, n


def test_unroll_learning_rate_and_momentum_match_finite_differences_of_torch_sgd():
    ns, warned = _run(_recipe("unroll_lr_momentum"), "unroll_lr_momentum")
    assert not warned, warned
    hp, w0, train_loss, val_loss = ns["hp"], ns["w0"], ns["train_loss"], ns["val_loss"]
    log_lr, momentum = float(hp["log_lr"].detach()), float(hp["momentum"].detach())
    assert abs(log_lr + 3.0) > 1e-3 and abs(momentum - 0.5) > 1e-3  # the outer steps moved both

    def unrolled(log_lr, momentum):  # val_loss(θ_20) with torch.optim.SGD itself, no graph kept
        w = w0.detach().clone().requires_grad_()
        opt = torch.optim.SGD([w], lr=torch.tensor(log_lr, dtype=D).exp().item(), momentum=momentum)
        for _ in range(20):
            opt.zero_grad()
            train_loss(w, None).backward()
            opt.step()
        with torch.no_grad():
            return float(val_loss(w, None))

    h = 1e-6
    fd = torch.tensor(
        [
            (unrolled(log_lr + h, momentum) - unrolled(log_lr - h, momentum)) / (2 * h),
            (unrolled(log_lr, momentum + h) - unrolled(log_lr, momentum - h)) / (2 * h),
        ],
        dtype=D,
    )
    grad = ns["grad"]
    got = torch.stack([grad["log_lr"], grad["momentum"]])
    assert fd.abs().min() > 1e-4  # both derivatives are far from zero: the comparison means something
    assert rel(got, fd) < 1e-6, (got, fd)


def test_maml_with_a_learned_lr_matches_a_hand_written_one_step_maml():
    ns, warned = _run(_recipe("maml_lr"), "maml_lr")
    assert not warned, warned
    model, log_lr, mse = ns["model"], ns["log_lr"], ns["mse"]
    assert abs(float(log_lr.detach()) + 2.0) > 1e-3  # the learning rate was meta-learned
    torch.manual_seed(1)
    xs, ys, xq, yq = ns["task"]()
    got = ns["hg"].compute(
        lambda m, h: mse(m, xs, ys), lambda m, h: mse(m, xq, yq), model, {"init": model, "log_lr": log_lr}
    )
    # by hand: θ_1 = φ − e^log_lr ∇L_support(φ), differentiated through the step
    names = [n for n, _ in model.named_parameters()]
    phi = [p.detach().clone().requires_grad_() for p in model.parameters()]
    alpha = log_lr.detach().clone().requires_grad_()
    loss = lambda theta, x, y: ((functional_call(model, dict(zip(names, theta)), (x,)) - y) ** 2).mean()
    grads = torch.autograd.grad(loss(phi, xs, ys), phi, create_graph=True)
    theta = [p - alpha.exp() * g for p, g in zip(phi, grads)]
    *expected, expected_lr = torch.autograd.grad(loss(theta, xq, yq), [*phi, alpha])
    for n, e in zip(names, expected):
        assert rel(got["init"][n], e) < 1e-10, n
    assert abs(float(got["log_lr"] - expected_lr)) <= 1e-10 * abs(float(expected_lr)), "log_lr"


def test_imaml_gives_the_closed_form_meta_gradient():
    ns, warned = _run(_recipe("imaml"), "imaml")
    assert not warned, warned
    x, y, xq, yq, lam = ns["x"], ns["y"], ns["xq"], ns["yq"], ns["lam"]
    grad = ns["init"].weight.grad.reshape(4, 1)
    phi = ns["init"].weight.detach().reshape(4, 1) + 0.1 * grad  # the init before the SGD meta-step
    # least squares: θ* = (A + λI)⁻¹(b + λφ), so dg/dφ = λ (A + λI)⁻¹ ∇g(θ*)
    a = 2 * x.T @ x / len(x) + lam * torch.eye(4, dtype=D)
    star = torch.linalg.solve(a, 2 * x.T @ y / len(x) + lam * phi)
    assert rel(ns["adapted"].weight.detach().reshape(4, 1), star) < 1e-10  # the copy was trained
    expected = lam * torch.linalg.solve(a, 2 * xq.T @ (xq @ star - yq) / len(xq))
    assert rel(grad, expected) < 1e-8


def test_hypercleaning_weights_corrupted_examples_down():
    ns, warned = _run(_recipe("hypercleaning"), "hypercleaning")
    assert not warned, warned
    weights, corrupted = ns["weights"], ns["corrupted"]
    clean, bad = weights[~corrupted], weights[corrupted]
    assert 60 < int(corrupted.sum()) < 100  # about 40% of 200
    assert float(clean.mean()) > float(bad.mean()) + 0.4, (float(clean.mean()), float(bad.mean()))
    auc = float((clean[:, None] > bad[None, :]).double().mean())  # P(a clean weight > a corrupted one)
    assert auc > 0.9, auc


def test_auxiliary_learner_raises_the_related_task_and_lowers_the_noise():
    ns, _ = _run(_recipe("auxiliary"), "auxiliary")  # trained online: the mode may warn (the text says so)
    learner, weights = ns["learner"], ns["combiner"].weights.detach()
    assert learner.steps == 200 and torch.isfinite(weights).all()
    assert float(weights[0]) == 1.0  # main_skip: the main task's weight is fixed
    related, noise = float(weights[1]), float(weights[2])
    assert related > 1.1 and noise < 0.95 and related > noise + 0.2, (related, noise)  # all started at 1


def test_the_testing_recipe_passes_a_correct_mode_and_reports_a_wrong_one():
    ns, warned = _run(_recipe("testing"), "testing")
    assert warned and all(w.startswith("implicit-neumann") for w in warned), warned  # only the cheap one
    assert "does not match finite differences" in ns["report"] and "'implicit-neumann'" in ns["report"]
    # the passing check's answer is the derivative of the Newton solve itself, by autograd
    h = ns["log_decay"].clone().requires_grad_()
    inner_loss = ns["inner_loss"]
    w = torch.zeros(5, dtype=D, requires_grad=True)
    for _ in range(20):
        (g,) = torch.autograd.grad(inner_loss(w, h), w, create_graph=True)
        hess = torch.stack([torch.autograd.grad(g[i], w, create_graph=True)[0] for i in range(5)])
        w = w - torch.linalg.solve(hess, g)
    (expected,) = torch.autograd.grad(ns["outer_loss"](w, h), h)
    assert rel(ns["computed"], expected) < 1e-8 and rel(ns["fd"], expected) < 1e-6


def test_the_maml_recipe_under_modes_matches_a_hand_written_loop():
    (code,) = [b for b in _blocks("Modes") if "sine_task" in b]
    ns, warned = _run(code, "maml")
    assert not warned, warned
    model, hg = ns["model"], ns["hg"]
    torch.manual_seed(2)
    task = ns["sine_task"]()
    got = hg.compute(*ns["task_losses"](*task), model, model)
    xs, ys, xq, yq = task
    names = [n for n, _ in model.named_parameters()]
    phi = [p.detach().clone().requires_grad_() for p in model.parameters()]
    loss = lambda theta, x, y: torch.nn.functional.mse_loss(
        functional_call(model, dict(zip(names, theta)), (x,)), y
    )
    theta = phi
    for _ in range(5):  # five SGD steps of lr 0.1 from θ_0 = φ, kept in the graph
        theta = [
            p - 0.1 * g
            for p, g in zip(theta, torch.autograd.grad(loss(theta, xs, ys), theta, create_graph=True))
        ]
    expected = torch.autograd.grad(loss(theta, xq, yq), phi)
    for n, e in zip(names, expected):
        assert rel(got[n], e) < 1e-5, n  # float32


def test_the_lasso_recipe_under_inner_problems_gives_the_closed_form():
    (code,) = [b for b in _blocks("Inner problems that are not one loss's minimum") if "FixedPoint" in b]
    ns, warned = _run(code, "lasso")  # the block asserts its own check; repeat it here
    assert not warned, warned
    X, Xv, yv, w, lam = ns["X"], ns["Xv"], ns["yv"], ns["w"].detach(), ns["lam"]
    s = w != 0
    assert 0 < int(s.sum()) < 8
    dw = -len(X) * torch.linalg.solve(X[:, s].T @ X[:, s], w[s].sign())
    expected = (Xv.T @ (Xv @ w - yv) / len(Xv))[s] @ dw
    assert abs(float(lam.grad - expected)) < 1e-8 and abs(float(expected)) > 1e-3
