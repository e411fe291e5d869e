"""One data-parallel call of :class:`~bilevel.HyperGradient`: setting up and agreeing.

:func:`agree_on_problem` builds the problem on every rank and checks, in the call's first
collective, that every rank could and that all hold the same layout, params, hparams and
mode state; it raises on every rank or on none (``distributed.py``). The call's last
collective is :meth:`~bilevel._src.distributed.Channel.finish`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .checkpoint import layout_of
from .distributed import (
    Channel,
    collective_device,
    contains_data_parallel,
    fingerprint,
    unwrap_pair,
)
from .errors import PeerError
from .problem import BilevelProblem
from .sharded import gather_sharded

__all__ = [
    "agree_on_problem",
    "note_collectives",
    "refuse_data_parallel",
    "warn_if_sharded",
]


def _state_tensors(state: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(state)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def agree_on_problem(
    channel: Channel,
    build: Callable[[Any, Any], BilevelProblem],
    params: Any,
    hparams: Any,
    check: Callable[[BilevelProblem], None],
    mode: Any,
) -> BilevelProblem:
    """The problem of this call, built and checked (``check``: the local layout check) on
    every rank, then agreed on in one all-gather; raises on every rank if any rank failed
    or the ranks hold different params, hparams, layouts or mode states."""
    failure: BaseException | None = None  # also KeyboardInterrupt: the others must not wait
    entries = None
    problem: BilevelProblem | None = None
    try:
        problem = build(*unwrap_pair(params, hparams))
        check(problem)
        gather_sharded(problem, mode)  # FSDP2 modules: full copies of their parameters
        seed = mode.random_seed()
        state = _state_tensors(mode.state_dict())
        entries = fingerprint(layout_of(problem), problem.theta0, problem.phi0, state, seed)
    except BaseException as error:  # noqa: BLE001 - every rank must hear of it before any raises
        failure = error
    gathered = channel.agree(entries, collective_device(channel.group))
    failed = [r for r in range(channel.world) if gathered[r, 0] != 0]
    if failure is not None:
        raise failure
    if failed:
        raise PeerError(
            f"rank(s) {', '.join(map(str, failed))} could not set up this hypergradient call "
            "(see their traceback); every rank stops here"
        )
    assert problem is not None
    _check_same(gathered, channel.rank)
    mode.reseed(int(gathered[0, -1]))  # every rank draws rank 0's random numbers
    channel.bind(problem.theta0, problem.phi0)
    return problem


_WHAT = (
    (1, 2, "structures, shapes or dtypes of params and hparams", "build them the same way on every rank"),
    (2, 5, "values of params", "broadcast them from rank 0 before training (DDP does at construction)"),
    (5, 8, "values of hparams", "broadcast them from rank 0, and step them with the same hypergradient"),
    (
        8,
        11,
        "HyperGradient states (warm start, optimizer state)",
        "load the same checkpoint on every rank, and call every rank's HyperGradient alike",
    ),
)


def _check_same(gathered: torch.Tensor, rank: int) -> None:
    """Raise, on every rank alike, if the ranks' agreement entries differ."""
    for start, stop, what, fix in _WHAT:
        block = gathered[:, start:stop]
        differ = [r for r in range(block.shape[0]) if not torch.equal(block[r], block[0])]
        if differ:
            raise ValueError(
                f"distributed: the ranks hold different {what} (rank(s) {', '.join(map(str, differ))} "
                f"differ from rank 0), so their hypergradients would belong to different problems; {fix}"
            )


def refuse_data_parallel(params: Any, hparams: Any) -> None:
    """A DDP module outside ``distributed=...`` would give this rank's shard alone, silently."""
    if contains_data_parallel(params) or contains_data_parallel(hparams):
        raise ValueError(
            "params/hparams hold a DistributedDataParallel (or DataParallel) module, but this "
            "HyperGradient was built without distributed=...: DDP averages gradients only inside "
            ".backward(), which a hypergradient never calls, so every rank would get its own "
            "shard's answer. Pass distributed=True for the hypergradient of the global batch, "
            "or distributed=False for this rank's shard alone (the wrapped module is used)"
        )


def warn_if_sharded(distributed: Any) -> str | None:
    """The warning for a call in a multi-process group that did not say what it wants
    (``distributed=None``): each rank then computes its own shard's hypergradient."""
    if distributed is not None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return (
        f"a process group of {dist.get_world_size()} ranks is initialised, but this HyperGradient "
        "was built without distributed=...: each rank computes the hypergradient of its own "
        "data. Pass distributed=True for the global one, or distributed=False to keep the local one"
    )


def note_collectives(stats: Any, channel: Channel, local_solves: bool) -> None:
    stats.extra["world_size"] = channel.world
    stats.extra["collectives"] = channel.collectives
    stats.extra["collective_bytes"] = channel.bytes
    if local_solves:
        stats.extra["local_solves"] = True
