"""MAML through ``unroll`` with the model as params and hparams, against a hand-written loop.

Sine-wave regression (Finn et al., 2017): an MLP 1 -> 40 -> 40 -> 1 (tanh), tasks of 10
support and 10 query points, 5 inner SGD steps with lr 0.01, a meta-batch of tasks. Per
meta-batch, each implementation returns the summed meta-gradient dg(θ_5)/dφ over the tasks:

  ours   ``HyperGradient("unroll", steps=5, lr=0.01).compute(inner, outer, model, model)``
         per task (θ_0 = φ, the same module as params and hparams)
  hand   plain torch.autograd: θ ← θ − lr·∇f(θ) with ``create_graph=True`` from θ_0 = the
         module's parameters, ``torch.func.functional_call`` for the forward passes, then
         ``torch.autograd.grad`` of the query loss w.r.t. the parameters

Timing: per round, each implementation runs once on the same meta-batch (their order
alternates between rounds), after untimed warm-up rounds; the ratio is the median over
rounds of ours/hand in the same round (a load change within a round slows both alike).
Also reports the median seconds and the relative difference of the results, and what one
loss evaluation of the model costs: called directly, through ``functional_call`` (what the
hand-written loop pays), and as the library evaluates it at its own tensors.

    python benchmarks/maml.py [--tasks 4] [--repeats 21] [--dtype float32] [--quick]

``--quick`` (the smoke test in tests/test_maml.py) runs 2 tasks and 3 rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel import BilevelProblem, HyperGradient

STEPS, LR = 5, 0.01
Task = tuple[Tensor, Tensor, Tensor, Tensor]


def sine_tasks(count: int, dtype: torch.dtype, seed: int = 0, points: int = 10) -> list[Task]:
    """Tasks y = a·sin(x + b), a ∈ [0.1, 5], b ∈ [0, π], x ∈ [−5, 5]: (support x, y, query x, y)."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        a, b = 0.1 + 4.9 * torch.rand(1, generator=g), torch.pi * torch.rand(1, generator=g)
        x = (10 * torch.rand(2 * points, 1, generator=g) - 5).to(dtype)
        y = (a * torch.sin(x + b)).to(dtype)
        tasks.append((x[:points], y[:points], x[points:], y[points:]))
    return tasks


def make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layers = (nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1))
    return nn.Sequential(*layers).to(dtype)


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).mean()


def _losses(xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Callable, Callable]:
    """A task's inner (support) and outer (query) losses; the hparams argument (the init) is unused."""
    return (lambda m, init: _mse(m(xs), ys)), (lambda m, init: _mse(m(xq), yq))


def ours(model: nn.Module) -> Callable[[list[Task]], list[Tensor]]:
    hg = HyperGradient("unroll", steps=STEPS, lr=LR)

    def run(tasks: list[Task]) -> list[Tensor]:
        total = [torch.zeros_like(p) for p in model.parameters()]
        for task in tasks:
            grads = hg.compute(*_losses(*task), model, model)
            total = [t + g for t, g in zip(total, grads.values())]
        return total

    return run


def hand(model: nn.Module) -> Callable[[list[Task]], list[Tensor]]:
    names = [n for n, _ in model.named_parameters()]

    def run(tasks: list[Task]) -> list[Tensor]:
        phi = list(model.parameters())
        total = [torch.zeros_like(p) for p in phi]
        for xs, ys, xq, yq in tasks:
            theta = phi
            for _ in range(STEPS):
                loss = _mse(functional_call(model, dict(zip(names, theta)), (xs,)), ys)
                grads = torch.autograd.grad(loss, theta, create_graph=True)
                theta = [p - LR * g for p, g in zip(theta, grads)]
            query = _mse(functional_call(model, dict(zip(names, theta)), (xq,)), yq)
            total = [t + g for t, g in zip(total, torch.autograd.grad(query, phi))]
        return total

    return run


@dataclass
class Result:
    tasks: int
    ours_s: float
    hand_s: float
    ratio: float  # median over rounds of ours / hand in the same round
    diff: float  # ‖ours − hand‖ / ‖hand‖


def measure(tasks: int, repeats: int, dtype: torch.dtype, warmup: int = 3) -> Result:
    model = make_model(dtype)
    batch = sine_tasks(tasks, dtype)
    runs = {"ours": ours(model), "hand": hand(model)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, list[Tensor]] = {}
    for round_ in range(warmup + repeats):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            start = time.perf_counter()
            results[name] = runs[name](batch)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    a, b = (torch.cat([t.flatten() for t in results[name]]) for name in ("ours", "hand"))
    return Result(
        tasks=tasks,
        ours_s=statistics.median(times["ours"]),
        hand_s=statistics.median(times["hand"]),
        ratio=statistics.median(o / h for o, h in zip(times["ours"], times["hand"])),
        diff=float((a - b).norm() / b.norm()),
    )


def evaluation_costs(dtype: torch.dtype, calls: int = 2000) -> dict[str, float]:
    """Microseconds per evaluation of a task's support loss at tensors other than the model's
    own (best of 5 runs of ``calls``): directly (the model at its own parameters, the floor),
    through ``functional_call``, and through ``BilevelProblem.inner`` (the library's path)."""
    model = make_model(dtype)
    xs, ys, _, _ = sine_tasks(1, dtype)[0]
    inner, outer = _losses(xs, ys, xs, ys)
    problem = BilevelProblem(inner, outer, model, model)
    theta, phi = problem.leaf_copies()
    named = dict(zip([n for n, _ in model.named_parameters()], theta))
    ways = {
        "direct": lambda: _mse(model(xs), ys),
        "functional_call": lambda: _mse(functional_call(model, named, (xs,)), ys),
        "bilevel": lambda: problem.inner(theta, phi),
    }
    costs = {}
    for name, way in ways.items():
        for _ in range(100):
            way()
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                way()
            runs.append((time.perf_counter() - start) / calls * 1e6)
        costs[name] = min(runs)
    return costs


def main(argv: list[str] | None = None) -> Result:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    tasks, repeats = (2, 3) if args.quick else (args.tasks, args.repeats)
    result = measure(tasks, repeats, getattr(torch, args.dtype), warmup=1 if args.quick else 3)
    print(f"MAML, {STEPS} SGD steps, MLP 1-40-40-1, {result.tasks} tasks, {args.dtype}, {repeats} rounds")
    print(f"{'ours ms':>9} {'hand ms':>9} {'ours/hand':>10} {'rel diff':>9}")
    print(f"{result.ours_s * 1e3:9.2f} {result.hand_s * 1e3:9.2f} {result.ratio:10.3f} {result.diff:9.1e}")
    costs = evaluation_costs(getattr(torch, args.dtype), calls=200 if args.quick else 2000)
    print("one support-loss evaluation, us: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    return result


if __name__ == "__main__":
    main()
