"""Auxiliary models that combine per-sample, per-task losses into one training loss.

Inputs are losses of shape (B, T) (batch, tasks; column 0 is the main task) or per-pixel
loss maps (B, T, H, W). Each combiner returns a scalar: the batch (and pixel) mean of the
combined loss. Their parameters are the hyperparameters φ learned by hypergradients.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvCombiner", "LinearCombiner", "NonlinearCombiner"]


def _inverse_softplus(value: float) -> float:
    """x with softplus(x) = value > 0: log(e^v − 1) = v + log(1 − e^−v), stable for every v."""
    return value + math.log(-math.expm1(-value))


def _check_num_tasks(num_tasks: int, least: int = 1) -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < least:
        raise ValueError(
            f"num_tasks must be an int >= {least} (the main task and the auxiliary ones), got {num_tasks!r}"
        )


def _check_losses(losses: Tensor, num_tasks: int, dims: int) -> None:
    if losses.dim() != dims or losses.shape[1] != num_tasks:
        shape = "(B, T)" if dims == 2 else "(B, T, H, W)"
        raise ValueError(
            f"losses must have shape {shape} with T={num_tasks} tasks, got {tuple(losses.shape)}"
        )


class LinearCombiner(nn.Module):
    """``mean_b Σ_t w_t · loss[b, t]`` with non-negative weights ``w = softplus(raw)``.

    ``main_skip=True`` fixes the main task's weight (column 0) to 1 and learns only the
    auxiliary weights, so the main loss can never be switched off. Weights start at ``init``.
    """

    def __init__(self, num_tasks: int, main_skip: bool = False, init: float = 1.0) -> None:
        super().__init__()
        _check_num_tasks(num_tasks, 2 if main_skip else 1)  # main_skip: something left to learn
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not 0 < init < math.inf:
            raise ValueError(
                f"init must be a finite number > 0 (the weights are softplus(raw), "
                f"positive), got {init!r}; a weight near 0 is e.g. init=1e-3"
            )
        self.num_tasks, self.main_skip = num_tasks, main_skip
        learned = num_tasks - 1 if main_skip else num_tasks
        self.raw = nn.Parameter(torch.full((learned,), _inverse_softplus(init)))

    @property
    def weights(self) -> Tensor:
        w = F.softplus(self.raw)
        return torch.cat([w.new_ones(1), w]) if self.main_skip else w

    def forward(self, losses: Tensor) -> Tensor:
        _check_losses(losses, self.num_tasks, 2)
        return (losses * self.weights).sum(1).mean()


class _MonotoneLinear(nn.Linear):
    """A linear layer with non-negative weights (softplus of the raw ones)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.softplus(self.weight), self.bias)


class NonlinearCombiner(nn.Module):
    """A small MLP over each sample's task losses: ``mean_b [loss[b, 0] + net(loss[b, :])]``.

    The main loss enters directly (a skip connection) and the network adds a learned
    non-negative combination (softplus output). ``monotone=True`` keeps every weight
    non-negative and every activation increasing, so the combined loss never decreases when a
    task loss grows (a learned loss can then not reward failing a task).
    """

    def __init__(self, num_tasks: int, hidden: tuple[int, ...] = (16,), monotone: bool = False) -> None:
        super().__init__()
        _check_num_tasks(num_tasks)
        self.num_tasks = num_tasks
        layer = _MonotoneLinear if monotone else nn.Linear
        sizes = (num_tasks, *hidden, 1)
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            blocks.append(layer(a, b))
            if i < len(sizes) - 2:
                blocks.append(nn.Softplus() if monotone else nn.Tanh())
        self.net = nn.Sequential(*blocks)

    def forward(self, losses: Tensor) -> Tensor:
        _check_losses(losses, self.num_tasks, 2)
        return (losses[:, 0] + F.softplus(self.net(losses)).squeeze(1)).mean()


class ConvCombiner(nn.Module):
    """A small convolutional net over per-pixel loss maps (B, T, H, W) for dense tasks
    (segmentation, depth): a learned non-negative per-pixel weighting of the tasks that sees
    the neighbourhood, plus the main loss map; returns the mean over batch and pixels."""

    def __init__(self, num_tasks: int, hidden_channels: int = 8, kernel_size: int = 3) -> None:
        super().__init__()
        _check_num_tasks(num_tasks)
        self.num_tasks = num_tasks
        # "same" padding keeps the map's size for every kernel size (an even one pads unevenly)
        self.net = nn.Sequential(
            nn.Conv2d(num_tasks, hidden_channels, kernel_size, padding="same"),
            nn.Tanh(),
            nn.Conv2d(hidden_channels, num_tasks, kernel_size, padding="same"),
        )

    def forward(self, losses: Tensor) -> Tensor:
        _check_losses(losses, self.num_tasks, 4)
        weights = F.softplus(self.net(losses))
        return (losses[:, 0] + (weights * losses).sum(1)).mean()
