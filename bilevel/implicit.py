"""The implicit-differentiation engine, for writing a mode of one's own.

``implicit_hypergradient(problem, solve, stats)`` computes ``∂g/∂φ − (∇²φθ f) x`` with
``x = solve(operator, ∂g/∂θ)``; see :mod:`bilevel.modes` for the registered modes built on it.
"""

from ._src.implicit import implicit_hypergradient

__all__ = ["implicit_hypergradient"]
