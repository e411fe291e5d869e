"""What a linear solve returns: the solution and its own diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ..tree_math import axpy, norm
from ..typing import MatVec, Tensors

__all__ = ["BREAKDOWNS", "SolveResult", "true_residual"]

#: the ways a solve can break down; a solver sets one, with its own message
BREAKDOWNS = ("negative_curvature", "diverged", "singular")


@dataclass
class SolveResult:
    """``x`` ≈ A⁻¹v and what it took.

    ``products`` counts products with ``A``; ``residual`` is ‖v − A x‖ / ‖v‖ where the solver
    knows it (None otherwise); ``converged`` is the solver's own verdict (None where it has no
    test). ``breakdown`` names what went wrong (one of :data:`BREAKDOWNS`, or None) and
    ``message`` explains it and names the fix; the flags ``negative_curvature``, ``diverged``
    and ``singular`` say the same (a solve may set either: each sets the other). A solve that
    runs without host synchronisation (``sync=False``) leaves the host numbers unset and keeps
    its diagnostics as device tensors in ``info``; the solver's ``*_report`` function reads them.
    """

    x: Tensors
    products: int
    iters: int
    residual: float | None = None
    converged: bool | None = None
    negative_curvature: bool = False
    diverged: bool = False
    singular: bool = False
    breakdown: str | None = None
    message: str = ""
    info: dict[str, Tensor] = field(default_factory=dict, repr=False)
    #: which iterate ``x`` is, where the solver returns another than its last (0: the start)
    iterate: int | None = None

    def __post_init__(self) -> None:
        if self.breakdown is None:  # a solve that set a flag: the first one set names it
            self.breakdown = next((kind for kind in BREAKDOWNS if getattr(self, kind)), None)
        elif self.breakdown in BREAKDOWNS:
            setattr(self, self.breakdown, True)
        else:
            raise ValueError(
                f"breakdown must be None or one of {', '.join(BREAKDOWNS)}, got {self.breakdown!r}"
            )


def true_residual(apply: MatVec, x: Tensors, v: Tensors, solve: str) -> tuple[Tensors, float]:
    """``r = v − A x`` and ``‖r‖/‖v‖`` (one product, one host read; 0 for ``v = 0``): what a
    solver reports instead of its recurrence's estimate, which drifts in finite precision.
    A non-finite residual raises, naming ``solve``."""
    r = axpy(-1.0, apply(x), v)
    v_norm, r_norm = torch.stack((norm(v), norm(r))).tolist()
    if not math.isfinite(r_norm):
        raise NonFiniteError(f"non-finite values in the residual product of {solve}")
    return r, r_norm / v_norm if v_norm > 0 else 0.0
