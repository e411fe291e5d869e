"""Linear solvers for ``A x = v`` on tuples of tensors, given only products with ``A``.

Pure functions, usable on their own; the implicit modes call them with ``A`` the inner
Hessian (or the transposed Jacobian of a stationarity map).
"""

from ._src.solvers import (
    Sketch,
    SolveResult,
    column_sketch,
    conjugate_gradient,
    damping_ramp,
    dense_solve,
    gaussian_sketch,
    gmres,
    minres,
    neumann,
    nystrom_preconditioner,
    power_iteration,
    sketch_solve,
)

__all__ = [
    "Sketch",
    "SolveResult",
    "column_sketch",
    "conjugate_gradient",
    "damping_ramp",
    "dense_solve",
    "gaussian_sketch",
    "gmres",
    "minres",
    "neumann",
    "nystrom_preconditioner",
    "power_iteration",
    "sketch_solve",
]
