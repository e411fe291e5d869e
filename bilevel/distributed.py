"""Data-parallel hypergradients: ``HyperGradient(..., distributed=True)`` and its helpers."""

from ._src.distributed import shard_weight
from ._src.errors import PeerError

__all__ = ["PeerError", "shard_weight"]
