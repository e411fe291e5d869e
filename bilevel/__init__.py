"""bilevel: hypergradients for bilevel problems in PyTorch, unrolled and implicit, one interface."""
from .errors import (HypergradientWarning, NoDoubleBackwardError, NonFiniteError,
                     SolverBreakdownError)
from .hypergradient import HyperGradient
from .modes import Mode, available_modes, register_mode
from .problem import BilevelProblem
from .stats import Stats

__version__ = "0.1.0"

__all__ = [
    "BilevelProblem", "HyperGradient", "HypergradientWarning", "Mode", "NoDoubleBackwardError",
    "NonFiniteError", "SolverBreakdownError", "Stats", "available_modes", "register_mode",
]
