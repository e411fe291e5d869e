"""bilevel: hypergradients for bilevel problems in PyTorch, unrolled and implicit, one interface."""

from ._src.conditions import FixedPoint, Root
from ._src.errors import (
    HypergradientWarning,
    NoDoubleBackwardError,
    NonFiniteError,
    PeerError,
    SolverBreakdownError,
)
from ._src.hypergradient import HyperGradient
from ._src.problem import BilevelProblem
from ._src.stats import Stats
from ._version import __version__
from .modes import Mode, available_modes, register_mode

__all__ = [
    "BilevelProblem",
    "FixedPoint",
    "HyperGradient",
    "HypergradientWarning",
    "Mode",
    "NoDoubleBackwardError",
    "NonFiniteError",
    "PeerError",
    "Root",
    "SolverBreakdownError",
    "Stats",
    "__version__",
    "available_modes",
    "register_mode",
]
