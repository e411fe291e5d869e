"""Linear solvers for ``A x = v`` on tuples of tensors, given only products with ``A``.

Pure functions: ``matvec`` maps a tuple of tensors to a tuple of the same shapes; nothing
here knows about losses or models. In the implicit modes ``A`` is the inner Hessian ``H``
(or the transposed Jacobian ``Jᵀ`` of a non-gradient stationarity map). Each returns a
:class:`SolveResult` with its own diagnostics: residual, verdict, breakdown and message.
"""

from .cg import (
    NEGATIVE_CURVATURE,
    Precondition,
    conjugate_gradient,
    conjugate_gradient_report,
    damped,
)
from .dense import SINGULAR, dense_solve
from .gmres import gmres
from .minres import MINRES_SINGULAR, minres
from .neumann import (
    DIVERGED,
    neumann,
    neumann_report,
    power_iteration,
    power_iteration_estimate,
    random_start,
)
from .nystrom import Sketch, column_sketch, gaussian_sketch, nystrom_preconditioner, sketch_solve
from .ramp import damping_ramp
from .result import BREAKDOWNS, SolveResult, true_residual

#: each breakdown's explanation, as its solver gives it (for a solve that sets only the flag)
MESSAGES = {"negative_curvature": NEGATIVE_CURVATURE, "diverged": DIVERGED, "singular": SINGULAR}

__all__ = [
    "BREAKDOWNS",
    "MESSAGES",
    "MINRES_SINGULAR",
    "Precondition",
    "Sketch",
    "SolveResult",
    "column_sketch",
    "conjugate_gradient",
    "conjugate_gradient_report",
    "damped",
    "damping_ramp",
    "dense_solve",
    "gaussian_sketch",
    "gmres",
    "minres",
    "neumann",
    "neumann_report",
    "nystrom_preconditioner",
    "power_iteration",
    "power_iteration_estimate",
    "random_start",
    "sketch_solve",
    "true_residual",
]
