"""``truncated-unroll``: backpropagate through the last K inner optimizer steps only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ._unrolled import UnrolledMode
from .base import check_positive, register_mode

__all__ = ["TruncatedUnroll"]


@register_mode
@dataclass
class TruncatedUnroll(UnrolledMode):
    """Like ``unroll``, but only the last ``truncate`` of ``steps`` steps carry the graph
    (θ_{T−K} is detached), so memory grows with ``truncate``, not ``steps``.

    Options: ``truncate`` (default 5) plus those of :class:`bilevel.modes._unrolled.UnrolledMode`
    (``steps=10``, SGD with ``lr=0.1``, torchopt). From an exact inner minimum, K truncated
    SGD steps with step α equal ``implicit-neumann`` with ``iters=K, alpha=α``.
    """

    name: ClassVar[str] = "truncated-unroll"
    truncate: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("truncate", self.truncate, integer=True)
        if self.truncate > self.steps:
            raise ValueError(
                f"option truncate={self.truncate} exceeds steps={self.steps}: only steps "
                "that are run can carry the graph; lower truncate or raise steps"
            )

    def graph_steps(self) -> int:
        return self.truncate
