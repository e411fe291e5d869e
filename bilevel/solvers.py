"""Linear solvers for ``A x = v`` on tuples of tensors, given only products with ``A``.

Pure functions, usable on their own; the implicit modes call them with ``A`` the inner
Hessian (or the transposed Jacobian of a stationarity map).
"""

from ._src.solvers import (
    SolveResult,
    conjugate_gradient,
    dense_solve,
    gmres,
    neumann,
    nystrom,
    power_iteration,
)

__all__ = [
    "SolveResult",
    "conjugate_gradient",
    "dense_solve",
    "gmres",
    "neumann",
    "nystrom",
    "power_iteration",
]
