"""FSDP2 (``fully_shard``) modules as params under ``distributed=True``, on W gloo processes.

Each rank holds a shard of the model's parameters and of the data; the library gathers the
parameters once per call and must return the single-process hypergradient of the full model
on the full batch, leave the sharded module as it was, and train on normally afterwards.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from parallel import rel, run_ranks
from test_distributed import Net, data, module_losses, shard

import bilevel

fsdp = pytest.importorskip("torch.distributed.fsdp")

CASES = [
    ("implicit-cg", {"iters": 100, "tol": 1e-13}),
    ("implicit-minres", {"tol": 1e-13}),
    ("unroll", {"steps": 4, "lr": 0.1}),
    ("implicit-cg", {"iters": 100, "tol": 1e-12, "hvp": "finite-difference"}),
]


def sharded_net(world: int):
    from torch.distributed.device_mesh import init_device_mesh

    net = Net()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (net.hidden, net.out):
        fsdp.fully_shard(layer, mesh=mesh)
    fsdp.fully_shard(net, mesh=mesh)
    return net


def hypergradients(rank: int, world: int) -> dict:
    warnings.simplefilter("ignore", bilevel.HypergradientWarning)
    net = sharded_net(world) if world > 1 else Net()
    inner, outer = module_losses(*shard(data(), rank, world))
    log_decay = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    out = {}
    for mode, options in CASES:
        hg = bilevel.HyperGradient(mode, distributed=True if world > 1 else None, **options)
        out[f"{mode}{options.get('hvp', '')}"] = hg.compute(inner, outer, net, log_decay).numpy()
    # the module is as it was, and trains on: one step of its own, then its full values
    x, y = shard(data(), rank, world)[:2]
    loss = (net(x) - y).pow(2).mean()
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in net.parameters()]
    out["after_a_step"] = torch.cat([p.detach().reshape(-1) for p in full]).numpy()
    if world > 1:
        plain = bilevel.HyperGradient("implicit-cg", iters=5)
        try:
            plain.compute(inner, outer, net, log_decay)
            out["without_distributed"] = "ok"
        except ValueError as error:
            out["without_distributed"] = str(error)
    return out


@functools.cache
def ranks(world: int) -> tuple:
    return tuple(run_ranks(hypergradients, world, timeout=120))


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_fully_sharded_module_gives_the_single_process_hypergradient(world):
    expected = hypergradients(0, 1)
    results = ranks(world)
    for key in expected:
        for r in results:
            assert rel(r[key], expected[key]) < 1e-9, key
            assert np.array_equal(r[key], results[0][key]), key
    for r in results:
        assert "distributed=True" in r["without_distributed"]
