"""The implementation. Nothing here is public API: import from ``bilevel`` and its public
modules (``bilevel.modes``, ``bilevel.solvers``, ``bilevel.implicit``, ``bilevel.errors``,
``bilevel.memory``, ``bilevel.testing``, ``bilevel.auxiliary``), which re-export."""

__all__: list[str] = []
