"""examples/distributed_hpo.py under ``torchrun --nproc_per_node=2``, and benchmarks/distributed.py
``--quick``: both run to the end on 2 gloo processes, under hard timeouts (a hang fails)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_bounded(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own: at the timeout every process it started
    (torchrun and its workers) is killed and the test fails, so a hang never blocks CI."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
    }
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout:.0f} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, None)


@pytest.mark.slow
def test_distributed_hpo_example_under_torchrun():
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "examples" / "distributed_hpo.py"),
        "--outer-steps",
        "3",
    ]
    result = run_bounded(command, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "hparams identical on all 2 ranks: True" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3  # one table row per outer step, printed by rank 0 alone


@pytest.mark.slow
def test_distributed_benchmark_quick():
    """The benchmark's smoke run at W = 1 and 2 (it exits non-zero if the ranks'
    hypergradients are not bit-identical) prints its tables."""
    result = run_bounded(
        [sys.executable, str(ROOT / "benchmarks" / "distributed.py"), "--quick"], timeout=120
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "collectives / call" in result.stdout and "local_solves" in result.stdout
