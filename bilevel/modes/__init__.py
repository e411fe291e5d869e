"""The registered modes. Each file defines one mode; importing it registers it."""
from .base import Mode, available_modes, get_mode, register_mode
from . import implicit_cg, implicit_exact, implicit_gmres, implicit_identity, implicit_neumann, implicit_nystrom  # noqa: F401
from . import truncated_unroll, unroll  # noqa: F401

__all__ = ["Mode", "available_modes", "get_mode", "register_mode"]
