"""``unroll``: backpropagate through all inner optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ._unrolled import UnrolledMode
from .base import register_mode

__all__ = ["Unroll"]


@register_mode
@dataclass
class Unroll(UnrolledMode):
    """Run ``steps`` differentiable inner-optimizer steps from ``params`` and backpropagate
    ``outer_loss`` at the result to ``hparams`` through all of them (memory grows with
    ``steps``; ``checkpoint="auto"`` bounds it to about √steps graphs by recomputation,
    ``direction="forward"`` makes it independent of ``steps`` for a few hyperparameters).
    Does not assume ``params`` is a minimiser. Options: see
    :class:`bilevel.modes._unrolled.UnrolledMode` (``steps=10``, SGD with ``lr=0.1``, torchopt).
    """

    name: ClassVar[str] = "unroll"

    def graph_steps(self) -> int:
        return self.steps
