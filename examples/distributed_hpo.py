"""Data-parallel hyperparameter optimisation: per-feature weight decay of a DDP-trained MLP.

    torchrun --nproc_per_node=2 examples/distributed_hpo.py     # 2 CPU processes (gloo)
    python examples/distributed_hpo.py                          # the same as a 1-process group

Problem: regression with an MLP (30 → 32 → 1, tanh) on scikit-learn's ``make_friedman1``
(30 features, of which the first 5 carry a nonlinear signal, plus noise; no download; 256
training, 256 validation and 1000 test rows). The hyperparameters are
one log weight decay per input feature, acting on that feature's column of the first layer,
and one for the output layer: φ ∈ R³¹. Inner loss: training MSE + ½ Σⱼ exp(φⱼ) ‖W₁[:, j]‖² +
½ exp(φ_out) ‖W₂‖². Outer loss: validation MSE.

Every rank holds an equal shard of the training and validation rows (a ``DistributedSampler``
split) and the same θ and φ. The inner problem is trained the usual DDP way: the model is
wrapped in ``DistributedDataParallel``, whose ``.backward()`` averages the gradients over the
ranks, so every rank takes the same step. The outer step calls
``HyperGradient("implicit-cg", distributed=True).backward(...)``: every derivative inside
the call (the Hessian products of CG, the gradients of the validation loss) is averaged over
the ranks, so each rank gets the hypergradient of the whole (concatenated) data set, bit for
bit the same on every rank, and an ordinary optimizer steps φ identically everywhere. Rank 0
prints one row per outer step; at the end all ranks gather φ and check that it is identical.

Options: ``--outer-steps``, ``--inner-steps``, ``--seed``. Takes about 10 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import make_friedman1
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from bilevel import HyperGradient

FEATURES, INFORMATIVE, HIDDEN = 30, 5, 32  # Friedman #1: features 0-4 carry the signal


def init_process_group() -> None:
    """Under torchrun: the environment it sets. With plain ``python``: a 1-process group."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    # a hard timeout: a rank that never reaches a collective fails the others, never hangs them
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))


def load_shard(rank: int, world: int, seed: int) -> tuple[torch.Tensor, ...]:
    """This rank's rows of the training and validation sets, and the whole test set.

    Every rank generates the same data (same seed) and keeps the rows a ``DistributedSampler``
    assigns it (``drop_last``: equal shard sizes, which exact averaging needs)."""
    x, y = make_friedman1(n_samples=1512, n_features=FEATURES, noise=1.0, random_state=seed)
    x = (x - 0.5) / 0.29  # uniform on [0, 1]: standardised
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    y = (y - y.mean()) / y.std()
    splits = {"train": (0, 256), "val": (256, 512), "test": (512, 1512)}
    out = []
    for name, (lo, hi) in splits.items():
        xs, ys = x[lo:hi], y[lo:hi]
        if name != "test":
            sampler = DistributedSampler(
                range(len(xs)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
            rows = torch.tensor(list(sampler))
            xs, ys = xs[rows], ys[rows]
        out += [xs, ys]
    return tuple(out)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x))).squeeze(-1)


def penalty(net: MLP, log_decay: torch.Tensor) -> torch.Tensor:
    """½ Σⱼ exp(φⱼ) ‖W₁[:, j]‖² + ½ exp(φ_out) ‖W₂‖²."""
    decay = log_decay.exp()
    per_feature = (net.hidden.weight**2).sum(0)  # one entry per input feature
    return 0.5 * (decay[:FEATURES] * per_feature).sum() + 0.5 * decay[FEATURES] * (net.out.weight**2).sum()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outer-steps", type=int, default=10)
    parser.add_argument("--inner-steps", type=int, default=300, help="DDP training steps per outer step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the ranks share the machine's cores
    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        result = run(args, rank, world)
        # free the DDP module (its reducer sits in reference cycles) before the group it uses,
        # on every rank: torn down the other way round at exit, gloo can abort the process
        gc.collect()
        dist.barrier()
        return result
    finally:
        gc.collect()
        dist.destroy_process_group()


def run(args: argparse.Namespace, rank: int, world: int) -> dict:
    start = time.perf_counter()
    x, y, xv, yv, xt, yt = load_shard(rank, world, args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = DistributedDataParallel(MLP())
    log_decay = torch.full((FEATURES + 1,), -3.0, requires_grad=True)
    inner_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    outer_opt = torch.optim.Adam([log_decay], lr=0.2)

    # closures over this rank's shard, mean losses: the library averages over the ranks
    def inner(net: MLP, phi: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(net(x), y) + penalty(net, phi)

    def outer(net: MLP, phi: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(net(xv), yv)

    def global_mean(value: torch.Tensor) -> float:
        value = value.detach().clone()
        dist.all_reduce(value)
        return value.item() / world

    def global_gradient(loss: torch.Tensor, params) -> torch.Tensor:
        """∇θ of the global inner loss (how far θ is from stationary), flat."""
        flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params))])
        dist.all_reduce(flat)
        return flat / world

    # damping bounds CG on the Hessian of an MLP trained only approximately (not exactly
    # at its minimum); the tolerance is float32's
    hg = HyperGradient("implicit-cg", distributed=True, iters=200, tol=1e-4, damping=3e-2)
    if rank == 0:
        print(f"{world} rank(s), {len(x)} training and {len(xv)} validation rows each (gloo, CPU)\n")
        print("| outer step | val loss | ‖∇θ f‖ | ‖hypergradient‖ | CG residual | products | collectives |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    history = []
    for step in range(args.outer_steps):
        # inner problem: the usual DDP loop, full shard per step (warm-started from the last θ)
        for _ in range(args.inner_steps):
            inner_opt.zero_grad()
            loss = F.mse_loss(model(x), y) + penalty(model.module, log_decay.detach())
            loss.backward()  # DDP averages these gradients over the ranks
            inner_opt.step()
        if step == 0:
            first_test = F.mse_loss(model.module(xt), yt).item()  # at the initial decays
        # outer step: the exact data-parallel hypergradient into log_decay.grad
        outer_opt.zero_grad()
        hg.backward(inner, outer, model, log_decay)
        stats = hg.stats
        val = global_mean(outer(model.module, log_decay))
        grad_norm = global_gradient(inner(model.module, log_decay.detach()), model.parameters()).norm().item()
        row = {
            "step": step,
            "val_loss": val,
            "inner_grad_norm": grad_norm,
            "hypergradient_norm": log_decay.grad.norm().item(),
            "residual": stats.residual,
            "products": stats.hvps,
            "collectives": stats.extra["collectives"],
        }
        history.append(row)
        if rank == 0:
            print(
                f"| {step} | {val:.4f} | {grad_norm:.1e} | {row['hypergradient_norm']:.3e} | "
                f"{stats.residual:.1e} | {stats.hvps} | {row['collectives']} |"
            )
        outer_opt.step()

    # every rank holds the same φ: gather and compare bit for bit
    gathered = [torch.empty_like(log_decay) for _ in range(world)]
    dist.all_gather(gathered, log_decay.detach())
    identical = all(torch.equal(g, gathered[0]) for g in gathered)
    test = F.mse_loss(model.module(xt), yt).item()  # every rank holds the whole test set
    decay = log_decay.detach()
    if rank == 0:
        kept = decay[:FEATURES].topk(INFORMATIVE, largest=False).indices
        hits = int((kept < INFORMATIVE).sum())
        print(
            f"\ntest MSE: {first_test:.4f} at the initial decays, "
            f"{test:.4f} after {args.outer_steps} outer steps"
        )
        print(f"the {INFORMATIVE} least decayed features: {hits} of them informative ({INFORMATIVE} are)")
        print(f"log decay of the output layer: {decay[FEATURES].item():.3f}")
        print(f"hparams identical on all {world} ranks: {identical}")
        print(f"wall time: {time.perf_counter() - start:.1f} s")
    if not identical:
        raise SystemExit("the ranks' hyperparameters differ")
    return {"history": history, "identical": identical, "test_loss": test, "log_decay": decay}


if __name__ == "__main__":
    main()
