"""Run a function on W gloo processes on 127.0.0.1, with a hard timeout: a hang fails, never waits.

``run_ranks(target, world, *args)`` spawns ``world`` processes, each of which initialises a
gloo process group and returns ``target(rank, world, *args)`` (picklable values: numpy
arrays, numbers, strings). It returns the ranks' results in rank order, raises with every
failing rank's traceback, and kills every process still running at ``timeout`` seconds.
"""

from __future__ import annotations

import datetime
import gc
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch.multiprocessing as mp

__all__ = ["RankError", "outcome", "rel", "run_ranks"]


class RankError(AssertionError):
    """A rank raised, or the ranks did not finish in time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    target: Callable, rank: int, world: int, port: int, results: Any, timeout: float, args: tuple
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            results.put((rank, True, target(rank, world, *args)))
        finally:
            gc.collect()  # DDP objects freed after their group can hang in gloo's teardown
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))


def run_ranks(target: Callable, world: int, *args: Any, timeout: float = 60.0) -> list[Any]:
    """``[target(rank, world, *args) for rank in range(world)]``, each on its own process."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_entry, args=(target, rank, world, port, results, timeout, args), daemon=True)
        for rank in range(world)
    ]
    for p in processes:
        p.start()
    deadline = time.monotonic() + timeout
    outcomes: dict[int, tuple[bool, Any]] = {}
    try:
        while len(outcomes) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in processes) and results.empty():
                    break
                continue
            outcomes[rank] = (ok, value)
    finally:
        for p in processes:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
    missing = [r for r in range(world) if r not in outcomes]
    failed = {r: v for r, (ok, v) in outcomes.items() if not ok}
    if missing or failed:
        report = "".join(f"\n--- rank {r} ---\n{v}" for r, v in sorted(failed.items()))
        raise RankError(f"ranks {missing} did not finish within {timeout:.0f} s" * bool(missing) + report)
    return [outcomes[r][1] for r in range(world)]


def outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """(the exception's class name or "ok", its message): what a rank reports of a call."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test reads which rank raised what
        return type(error).__name__, str(error)
    return "ok", ""


def rel(a: Any, b: Any) -> float:
    """max |a − b| / max |b|, of arrays."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))
