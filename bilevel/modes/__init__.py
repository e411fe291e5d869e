"""The modes: one small file each, one protocol (:class:`Mode`), registered by name.

``HyperGradient("implicit-cg", iters=20)`` and ``HyperGradient(ImplicitCG(iters=20))`` are
the same; :func:`register_mode` adds a mode of one's own.
"""

from .base import Mode, available_modes, get_mode, register_mode
from .implicit_cg import ImplicitCG
from .implicit_exact import ImplicitExact
from .implicit_gmres import ImplicitGMRES
from .implicit_identity import ImplicitIdentity
from .implicit_minres import ImplicitMINRES
from .implicit_neumann import ImplicitNeumann
from .implicit_nystrom import ImplicitNystrom
from .penalty import Penalty
from .truncated_unroll import TruncatedUnroll
from .unroll import Unroll

__all__ = [
    "ImplicitCG",
    "ImplicitExact",
    "ImplicitGMRES",
    "ImplicitIdentity",
    "ImplicitMINRES",
    "ImplicitNeumann",
    "ImplicitNystrom",
    "Mode",
    "Penalty",
    "TruncatedUnroll",
    "Unroll",
    "available_modes",
    "get_mode",
    "register_mode",
]
