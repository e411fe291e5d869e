"""``implicit-cg``'s Nyström preconditioner, kept across calls.

The sketch costs ``rank`` products, so it is made once and reused while the system changes
slowly (as a warm start is), and made again every ``refresh`` calls or once PCG needs clearly
more iterations with it than on its first call (the system has drifted away from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._src.solvers.cg import Precondition
from .._src.solvers.nystrom import MatMat, Sketch, gaussian_sketch, nystrom_preconditioner
from .._src.stats import Stats
from .._src.typing import Tensors

__all__ = ["KeptSketch"]

#: a reused sketch is refreshed when PCG needs more than this factor times the iterations it
#: needed on the sketch's first call (and at least _GROWTH_SLACK more: counts of a few
#: iterations, as warm starts give, vary by more than a factor without the sketch aging)
_REFRESH_GROWTH, _GROWTH_SLACK = 1.5, 3


class KeptSketch:
    """The Nyström sketch of rank ``rank`` that preconditions successive solves. Each draw
    is seeded by the number of sketches made so far: reproducible, and resumable from a
    checkpoint on any device (a generator's state is a CPU tensor)."""

    def __init__(self, rank: int, refresh: int) -> None:
        self.rank, self.refresh = rank, refresh
        self.use: _Use | None = None
        self.made = 0

    @property
    def sketch(self) -> Sketch | None:
        return None if self.use is None else self.use.sketch

    def preconditioner(self, matmat: MatMat, v: Tensors, damping: float, stats: Stats) -> Precondition:
        """The preconditioner of ``A + damping·I`` from the kept sketch, or from a new one
        (``rank`` products through ``matmat``) when there is none, it does not fit ``v``, or
        it is stale; ``stats.extra["preconditioner"]`` says which."""
        size = sum(t.numel() for t in v)
        k = min(self.rank, size)
        use = self.use
        fresh = use is None or not use.fits(v, k) or use.stale(self.refresh)
        if use is None or fresh:
            generator = torch.Generator().manual_seed(self.made)
            sketch = gaussian_sketch(matmat, size, k, v[0].dtype, v[0].device, generator)
            use = self.use = _Use(sketch, [list(t.shape) for t in v])
            self.made += 1
        use.calls += 1
        values = use.sketch.eigenvalues
        stats.extra["preconditioner"] = {
            "kind": "nystrom",
            "rank": k,
            "refreshed": fresh,
            "calls": use.calls,
            "eigenvalue_max": float(values.max()),
            "eigenvalue_min": float(values.min()),
            "singular": use.sketch.singular,
        }
        return nystrom_preconditioner(use.sketch, damping)

    def age(self, iters: int) -> None:
        """Record PCG's iterations with the kept sketch: the first call's are the baseline."""
        if self.use is not None:
            self.use.baseline = iters if self.use.baseline is None else self.use.baseline
            self.use.last = iters

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {} if self.use is None else {"sketch": self.use.state()}
        return {**state, "sketches": self.made} if self.made else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sketch = state.get("sketch")
        self.use = None if sketch is None else _Use.from_state(sketch)
        self.made = int(state.get("sketches", 0))


@dataclass
class _Use:
    """A sketch, the shapes it was made for, and its use: the calls made with it and PCG's
    iterations on the first (``baseline``) and last of them."""

    sketch: Sketch
    shapes: list[list[int]]
    calls: int = 0
    baseline: int | None = None
    last: int | None = None

    def fits(self, v: Tensors, rank: int) -> bool:
        basis = self.sketch.basis
        same = [list(t.shape) for t in v] == self.shapes and basis.shape[1] == rank
        return same and basis.dtype == v[0].dtype and basis.device == v[0].device

    def stale(self, refresh: int) -> bool:
        if self.calls >= refresh:
            return True
        if self.baseline is None or self.last is None:
            return False
        return self.last > max(_REFRESH_GROWTH * self.baseline, self.baseline + _GROWTH_SLACK)

    def state(self) -> dict[str, Any]:
        return {
            "basis": self.sketch.basis,
            "eigenvalues": self.sketch.eigenvalues,
            "singular": self.sketch.singular,
            "shapes": self.shapes,
            "calls": self.calls,
            "baseline": self.baseline,
            "last": self.last,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Use:
        sketch = Sketch(state["basis"], state["eigenvalues"], bool(state["singular"]))
        shapes = [list(s) for s in state["shapes"]]
        return cls(sketch, shapes, state["calls"], state["baseline"], state["last"])
