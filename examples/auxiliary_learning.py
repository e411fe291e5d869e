"""Auxiliary learning on digits: do learned auxiliary-loss weights help a label-starved task?

Main task: 10-class digit recognition with only a few digit labels (scikit-learn's bundled
digits; no download). Auxiliary tasks have cheap labels on all 800 training images: the
digit's parity, whether it is at least 5, and a deliberately useless task with random labels.
A small MLP shares two hidden layers between the task heads.

Compared over several seeds (each seed: its own split, initial weights and labelled images;
main-task test accuracy, mean ± std, and the per-seed gain over single-task):
  single-task       main loss only
  equal weights     main + every auxiliary loss with weight 1 (the random task included)
  learned linear    AuxiliaryLearner: one non-negative weight per auxiliary loss (LinearCombiner,
                    main weight fixed to 1), learned by hypergradients of the main loss on 60
                    held-out labelled images
  module-aware      ModuleAwareWeights (MAOAL): one weight per (auxiliary loss, shared layer)
Both learned methods start from the equal weights and use implicit-gmres: away from a minimum
the Hessian of the training loss is indefinite (and module-aware weighting makes the system
non-symmetric), which GMRES handles.

    python examples/auxiliary_learning.py [--seeds 5] [--steps 400] [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from bilevel import HyperGradient
from bilevel.auxiliary import AuxiliaryLearner, LinearCombiner, ModuleAwareWeights

TASKS = ["digit", "parity", "at least 5", "random"]
METHODS = ["single-task", "equal weights", "learned linear", "module-aware"]
LR, META_LR, UPDATE_EVERY = 3e-3, 0.05, 5


def make_data(seed: int, labelled: int, device: str):
    """Train (800 images, digit labels on the first ``labelled``) / auxiliary (60 held-out
    images with digit labels, for hypergradients) / test (the remaining 937) splits."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    labels = torch.stack([y, y % 2, (y >= 5).long(), torch.randint(0, 2, y.shape, generator=g)], 1)
    has_digit = (torch.arange(len(y)) < labelled).float()
    split = lambda a, b: (x[a:b].to(device), labels[a:b].to(device), has_digit[a:b].to(device))
    return split(0, 800), split(800, 860), split(860, None)


class MultiTaskNet(nn.Module):
    """Two shared layers (the modules of module-aware weighting), then one head per task."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
        self.layer2 = nn.Sequential(nn.Linear(64, 32), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(32, 10), nn.Linear(32, 2), nn.Linear(32, 2), nn.Linear(32, 2)])

    def forward(self, x):
        features = self.layer2(self.layer1(x))
        return [head(features) for head in self.heads]


def per_sample_losses(model, batch):
    """(B, 4) cross-entropies, one column per task; the digit loss only where a digit label
    exists, scaled so that its batch mean is the mean over the labelled images."""
    x, labels, has_digit = batch
    losses = torch.stack(
        [F.cross_entropy(out, labels[:, t], reduction="none") for t, out in enumerate(model(x))], 1
    )
    main = losses[:, 0] * has_digit * (len(has_digit) / has_digit.sum())
    return torch.cat([main[:, None], losses[:, 1:]], 1)


def main_loss(model, batch):
    return F.cross_entropy(model(batch[0])[0], batch[1][:, 0])


def accuracy(model, batch):
    with torch.no_grad():
        return (model(batch[0])[0].argmax(1) == batch[1][:, 0]).float().mean().item()


def primary_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)


def train_fixed(model, train, weights, steps):
    """Plain training with fixed task weights."""
    opt = primary_optimizer(model)
    for _ in range(steps):
        opt.zero_grad()
        (per_sample_losses(model, train) * weights).sum(1).mean().backward()
        opt.step()


def train_learned_linear(model, train, aux, steps):
    combiner = LinearCombiner(4, main_skip=True, init=1.0).to(train[0].device)
    learner = AuxiliaryLearner(
        model,
        combiner,
        train_loss=lambda m, c, batch: c(per_sample_losses(m, batch)),
        main_loss=main_loss,
        primary_optimizer=primary_optimizer(model),
        auxiliary_optimizer=torch.optim.Adam(combiner.parameters(), lr=META_LR),
        hypergradient=HyperGradient("implicit-gmres", iters=20),
        update_every=UPDATE_EVERY,
    )
    for _ in range(steps):
        learner.step(train, aux)
    return combiner.weights.detach().cpu()


def train_module_aware(model, train, aux, steps):
    # scale=1: w[a, m] = relu(raw[a, m]) starts at 1, the equal weights
    weights = ModuleAwareWeights.from_model(model, num_aux=3, by="child", exclude=("heads",), scale=1.0).to(
        train[0].device
    )
    opt = primary_optimizer(model)
    meta = torch.optim.Adam(weights.parameters(), lr=META_LR)
    hypergradient = HyperGradient("implicit-gmres", iters=20)
    task_losses = lambda m: per_sample_losses(m, train).mean(0)
    for step in range(1, steps + 1):
        opt.zero_grad()
        weights.write_gradients(model, task_losses(model))  # G_m = ∇_m L_main + Σ_a w[a, m] ∇_m L_a
        opt.step()
        if step % UPDATE_EVERY == 0:
            meta.zero_grad()
            weights.backward(hypergradient, model, task_losses, lambda m: main_loss(m, aux))
            meta.step()
    return weights.weights().detach().cpu()


def run(method, seed, args):
    """Test accuracy of one method on one seed, and its learned weights (None if fixed)."""
    train, aux, test = make_data(seed, args.labelled, args.device)
    torch.manual_seed(seed)
    model = MultiTaskNet().to(args.device)
    learned = None
    if method == "single-task":
        train_fixed(model, train, torch.tensor([1.0, 0.0, 0.0, 0.0], device=args.device), args.steps)
    elif method == "equal weights":
        train_fixed(model, train, torch.ones(4, device=args.device), args.steps)
    elif method == "learned linear":
        learned = train_learned_linear(model, train, aux, args.steps)
    else:
        learned = train_module_aware(model, train, aux, args.steps)
    return accuracy(model, test), learned


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--labelled", type=int, default=50, help="digit labels among the 800 training images")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps (the smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 20
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    results = {m: [] for m in METHODS}
    seconds = {m: 0.0 for m in METHODS}
    weights = {}
    for seed in range(args.seeds):
        for method in METHODS:
            start = time.perf_counter()
            acc, learned = run(method, seed, args)
            seconds[method] += time.perf_counter() - start
            results[method].append(acc)
            if learned is not None:
                weights[method] = learned
        print(f"seed {seed}: " + ", ".join(f"{m} {results[m][-1]:.4f}" for m in METHODS), flush=True)

    print(
        f"\nmain-task test accuracy on 937 test images: {args.labelled} digit labels, "
        f"{args.seeds} seed(s), {args.steps} steps, {args.device}"
    )
    print(f"| {'method':<15} | {'accuracy':>15} | {'gain over single-task':>21} | {'s/seed':>6} |")
    print(f"|{'-' * 17}|{'-' * 17}|{'-' * 23}|{'-' * 8}|")
    for method, accs in results.items():
        mean, std = _mean_std(accs)
        gain = _mean_std([a - b for a, b in zip(accs, results["single-task"])])
        print(
            f"| {method:<15} | {mean:.4f} ± {std:.4f} | {gain[0]:+.4f} ± {gain[1]:.4f}{'':>5} | "
            f"{seconds[method] / args.seeds:6.1f} |"
        )
    if "learned linear" in weights:
        print(
            "\nlearned linear weights (last seed): "
            + ", ".join(f"{t} {w:.3f}" for t, w in zip(TASKS, weights["learned linear"].tolist()))
        )
    if "module-aware" in weights:
        print("module-aware weights (last seed), rows = auxiliary tasks, columns = layer1, layer2:")
        for task, row in zip(TASKS[1:], weights["module-aware"].tolist()):
            print(f"  {task:<11} " + " ".join(f"{w:.3f}" for w in row))
    return results, weights


if __name__ == "__main__":
    main()
