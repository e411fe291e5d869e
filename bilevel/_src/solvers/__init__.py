"""Linear solvers for ``A x = v`` on tuples of tensors, given only products with ``A``.

Pure functions: ``matvec`` maps a tuple of tensors to a tuple of the same shapes; nothing
here knows about losses or models. In the implicit modes ``A`` is the inner Hessian ``H``
(or the transposed Jacobian ``Jᵀ`` of a non-gradient stationarity map). Each returns a
:class:`SolveResult` with its own diagnostics: residual, verdict, breakdown and message.
"""

from .cg import NEGATIVE_CURVATURE, conjugate_gradient, conjugate_gradient_report, damped
from .dense import SINGULAR, dense_solve, nystrom
from .gmres import gmres
from .neumann import (
    DIVERGED,
    neumann,
    neumann_report,
    power_iteration,
    power_iteration_estimate,
    random_start,
)
from .result import BREAKDOWNS, SolveResult

#: each breakdown's explanation, as its solver gives it (for a solve that sets only the flag)
MESSAGES = {"negative_curvature": NEGATIVE_CURVATURE, "diverged": DIVERGED, "singular": SINGULAR}

__all__ = [
    "BREAKDOWNS",
    "MESSAGES",
    "SolveResult",
    "conjugate_gradient",
    "conjugate_gradient_report",
    "damped",
    "dense_solve",
    "gmres",
    "neumann",
    "neumann_report",
    "nystrom",
    "power_iteration",
    "power_iteration_estimate",
    "random_start",
]
