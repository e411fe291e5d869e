"""SavedTensorMemory: counts what autograd graphs hold, changes no derivative, leaks nothing."""

import gc
import weakref

import torch

from bilevel.memory import SavedTensorMemory


def _f(x):
    return (x.exp() * x.tanh()).sum() + (x.sigmoid() ** 3).sum()


def _third_order(x):
    (g,) = torch.autograd.grad(_f(x), x, create_graph=True)
    (h,) = torch.autograd.grad((g * g.exp()).sum(), x, create_graph=True)
    return h, torch.autograd.grad(h.sum(), x)[0]


def test_derivatives_of_every_order_are_unchanged_under_the_meter():
    x = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    expected = _third_order(x)
    with SavedTensorMemory() as meter:
        got = _third_order(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert meter.peak >= 50 * 8 and meter.live == 0


def test_a_graph_dropped_without_backward_is_freed_and_uncounted():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorMemory() as meter:
        y = x.exp()  # exp saves its own output: a reference cycle if the meter held it
        alive = weakref.ref(y)
        assert meter.live == 1000 * 4
        del y
    gc.collect()
    assert alive() is None and meter.live == 0 and meter.peak == 1000 * 4


def test_peak_counts_each_storage_once():
    x = torch.randn(256, requires_grad=True)
    with SavedTensorMemory() as meter:
        y = x.exp()
        z = (y * y).sum()  # y: saved by exp (its output) and twice by mul, one storage
        del y
        w = (x * 2.0).sin().sum()  # sin saves its input, a second storage
        torch.autograd.grad(z + w, x)
    assert meter.peak == 2 * 256 * 4 and meter.live == 0
