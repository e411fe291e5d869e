"""The warm start of the Krylov modes (``implicit-cg``, ``implicit-minres``): the previous
call's solution, kept where that solve converged, as the next solve's start."""

from __future__ import annotations

from typing import Any

from .._src.typing import Tensors

__all__ = ["WarmStarted"]


class WarmStarted:
    """Mixin for a mode dataclass with the option ``warm_start`` and a field ``_previous``."""

    warm_start: bool
    _previous: Tensors | None

    def _start(self, like: Tensors) -> Tensors | None:
        """The kept solution, if the option is on and it is shaped like ``like``."""
        x0 = self._previous if self.warm_start else None
        return x0 if x0 is not None and [t.shape for t in x0] == [t.shape for t in like] else None

    def _remember(self, x: Tensors, converged: bool) -> None:
        if self.warm_start:  # only a solve that converged is a good start for the next one
            self._previous = tuple(t.detach() for t in x) if converged else None

    def _warm_state(self) -> dict[str, Any]:
        return {"previous": self._previous} if self._previous is not None else {}

    def _load_warm_state(self, state: dict[str, Any]) -> None:
        self._previous = state.get("previous")

    def _warm_state_used(self) -> bool:
        return self.warm_start and self._previous is not None  # unused otherwise
