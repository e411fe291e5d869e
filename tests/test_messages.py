"""Rough edges a new user meets first (issue 21): warnings that point at the user's line,
errors that name what went wrong and the fix."""

import warnings

import pytest
import torch
import torchopt

from bilevel import HyperGradient, HypergradientWarning

from problems import ridge


def test_a_warning_points_at_the_users_call():
    problem = ridge(p=4)
    hg = HyperGradient("implicit-neumann", iters=2)  # far from converged: it warns
    with pytest.warns(HypergradientWarning, match="stopped above its tolerance") as record:
        hg.compute(problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    assert record[0].filename == __file__


def test_inference_mode_is_named():
    problem = ridge(p=4)
    args = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch.inference_mode\(\)"):
        HyperGradient("implicit-cg").compute(*args)
    with torch.no_grad():  # fine: the library enables grad where it needs it
        HyperGradient("implicit-cg").compute(*args)


def test_a_list_of_parameters_called_as_a_module_names_the_fix():
    model = torch.nn.Linear(3, 1).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    decay = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    inner = lambda m, d: ((m(x) - y) ** 2).mean() + d.exp() * (m.weight**2).sum()
    outer = lambda m, d: ((m(x) - y) ** 2).mean()
    with pytest.raises(TypeError, match=r"(inner|outer)_loss called a list as a module.*params=model"):
        HyperGradient("implicit-cg").compute(inner, outer, list(model.parameters()), decay)


def test_highers_adam_is_named_when_the_mode_is_built():
    with pytest.warns(HypergradientWarning, match="backend='higher' steps Adam with eps") as record:
        HyperGradient("unroll", inner_optimizer=torch.optim.Adam, backend="higher", lr=0.1)
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        HyperGradient("unroll", inner_optimizer=torch.optim.Adam, lr=0.1)  # torchopt matches torch


@pytest.mark.parametrize(
    "optimizer, says",
    [
        (torchopt.MetaSGD, "torchopt's module-level meta-optimizer"),
        (torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1), "inner_optimizer=torch.optim.SGD"),
    ],
)
def test_inner_optimizers_that_are_not_classes_are_named_with_the_fix(optimizer, says):
    """Issue 21: torchopt.MetaSGD with lr used to say "unknown option lr", and an optimizer
    instance dumped its whole repr."""
    with pytest.raises(TypeError, match="inner_optimizer must be a torch optimizer class") as caught:
        HyperGradient("unroll", steps=2, inner_optimizer=optimizer, lr=0.1)
    message = str(caught.value)
    assert says in message and "unknown option" not in message and "Parameter Group" not in message


def test_closures_that_draw_random_numbers_warn_once():
    """Issue 21: dropout in training mode made every call a different random hypergradient,
    silently; in eval mode (no draw) nothing is said."""
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randn(20, 1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    decay = torch.tensor(-2.0, requires_grad=True)

    def inner(model, log_decay):
        return ((model(x) - y) ** 2).mean() + log_decay.exp() * sum((p**2).sum() for p in model.parameters())

    def outer(model, log_decay):
        return ((model(x) - y) ** 2).mean()

    hg = HyperGradient("unroll", steps=3)
    with pytest.warns(HypergradientWarning, match="drew random numbers") as caught:
        hg.compute(inner, outer, net, decay)
    assert "model.eval()" in str(caught[0].message) and caught[0].filename == __file__
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HyperGradient("unroll", steps=3).compute(inner, outer, net, decay)


@pytest.mark.parametrize("mode", ["implicit-cg", "implicit-exact", "implicit-neumann"])
def test_implicit_modes_report_and_warn_how_far_params_is_from_stationary(mode):
    """Issue 21: untrained params gave a number with converged=True and no word; the norms
    come with the call's one read of the NaN checks."""
    problem = ridge()
    trained = problem.params_star()
    hg = HyperGradient(mode)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*far from a minimum")
        hg.compute(problem.inner_loss, problem.outer_loss, trained, problem.hparams)
    assert hg.stats.extra["stationarity"] < 1e-8 and hg.stats.extra["inner_gradient_norm"] < 1e-8
    untrained = torch.zeros_like(trained).requires_grad_()
    with pytest.warns(HypergradientWarning, match="far from a minimum of inner_loss") as caught:
        hg.compute(problem.inner_loss, problem.outer_loss, untrained, problem.hparams)
    assert caught[0].filename == __file__ and hg.stats.extra["stationarity"] > 0.5
