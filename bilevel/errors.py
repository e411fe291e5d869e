"""The exceptions and the warning that bilevel raises; every message names the fix."""

from ._src.errors import (
    HypergradientWarning,
    NoDoubleBackwardError,
    NonFiniteError,
    PeerError,
    SolverBreakdownError,
)

__all__ = [
    "HypergradientWarning",
    "NoDoubleBackwardError",
    "NonFiniteError",
    "PeerError",
    "SolverBreakdownError",
]
