"""Auxiliary learning on digits: do learned auxiliary-loss weights help a label-starved task?

Main task: 10-class digit recognition with only a few digit labels (scikit-learn's bundled
digits; no download). Auxiliary tasks have cheap labels on all 800 training images: the
digit's parity, whether it is at least 5, and a deliberately useless task with random
labels. A small MLP shares one hidden layer between the task heads.

Compared, over several seeds (test accuracy of the main task, mean ± std):
  single-task       main loss only
  equal weights     main + every auxiliary loss with weight 1 (the noise task included)
  learned linear    AuxiliaryLearner: weights of a LinearCombiner learned by hypergradients of
                    the main loss on a small held-out auxiliary set
  module-aware      ModuleAwareWeights: a weight per (auxiliary loss, shared module), MAOAL

    python examples/auxiliary_learning.py [--seeds 5] [--device cuda] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

from bilevel import HyperGradient, HypergradientWarning
from bilevel.auxiliary import AuxiliaryLearner, LinearCombiner, ModuleAwareWeights

TASKS = ["digit", "parity", "at least 5", "random"]


def make_data(seed: int, labelled: int, device: str):
    """Train (800 images, digit labels on the first ``labelled``) / auxiliary (60 held-out
    images with digit labels, for hypergradients) / test splits."""
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
    def __init__(self):
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(64, 10), nn.Linear(64, 2), nn.Linear(64, 2), nn.Linear(64, 2)])

    def forward(self, x):
        features = self.shared(x)
        return [head(features) for head in self.heads]


def per_sample_losses(model, batch):
    """(B, 4) cross-entropies, one column per task; the digit loss only where a digit label
    exists, scaled so that its batch mean is the mean over the labelled images."""
    x, labels, has_digit = batch
    losses = torch.stack([F.cross_entropy(out, labels[:, t], reduction="none")
                          for t, out in enumerate(model(x))], 1)
    main = losses[:, 0] * has_digit * (len(has_digit) / has_digit.sum())
    return torch.cat([main[:, None], losses[:, 1:]], 1)


def main_loss(model, batch):
    return F.cross_entropy(model(batch[0])[0], batch[1][:, 0])


def accuracy(model, batch):
    with torch.no_grad():
        return (model(batch[0])[0].argmax(1) == batch[1][:, 0]).float().mean().item()


def train_fixed(model, train, weights, steps):
    """Plain training with fixed task weights."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        (per_sample_losses(model, train) * weights).sum(1).mean().backward()
        opt.step()


def train_learned_linear(model, train, aux, steps, device):
    combiner = LinearCombiner(4, main_skip=True).to(device)
    learner = AuxiliaryLearner(
        model, combiner,
        train_loss=lambda m, c, batch: c(per_sample_losses(m, batch)),
        main_loss=main_loss,
        primary_optimizer=torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4),
        auxiliary_optimizer=torch.optim.Adam(combiner.parameters(), lr=0.05),
        hypergradient=HyperGradient("implicit-neumann", iters=10, alpha=0.5), update_every=5)
    for _ in range(steps):
        learner.step(train, aux)
    return combiner.weights.detach().cpu()


def train_module_aware(model, train, aux, steps):
    weights = ModuleAwareWeights.from_model(model, num_aux=3, by="tensor", exclude=("heads",)).to(train[0].device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    meta = torch.optim.Adam(weights.parameters(), lr=0.05)
    hypergradient = HyperGradient("implicit-neumann", iters=10, alpha=0.5)
    task_losses = lambda m: per_sample_losses(m, train).mean(0)
    for step in range(1, steps + 1):
        opt.zero_grad()
        weights.write_gradients(model, task_losses(model))
        opt.step()
        if step % 5 == 0:
            meta.zero_grad()
            weights.backward(hypergradient, model, task_losses, lambda m: main_loss(m, aux))
            meta.step()
    return weights.weights().detach().cpu()


def run(method, seed, args):
    train, aux, test = make_data(seed, args.labelled, args.device)
    torch.manual_seed(seed)
    model = MultiTaskNet().to(args.device)
    learned = None
    if method == "single-task":
        train_fixed(model, train, torch.tensor([1.0, 0.0, 0.0, 0.0], device=args.device), args.steps)
    elif method == "equal weights":
        train_fixed(model, train, torch.ones(4, device=args.device), args.steps)
    elif method == "learned linear":
        learned = train_learned_linear(model, train, aux, args.steps, args.device)
    else:
        learned = train_module_aware(model, train, aux, args.steps)
    return accuracy(model, test), learned


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--labelled", type=int, default=50, help="digit labels among the 800 training images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 20
    methods = ["single-task", "equal weights", "learned linear", "module-aware"]
    results = {m: [] for m in methods}
    weights = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypergradientWarning)  # far from a minimum early on
        for seed in tqdm(range(args.seeds), desc="seeds", disable=None):
            for method in methods:
                acc, learned = run(method, seed, args)
                results[method].append(acc)
                if learned is not None:
                    weights[method] = learned
    print(f"\nmain-task test accuracy ({len(make_data(0, args.labelled, 'cpu')[2][0])} test images), "
          f"{args.labelled} digit labels, {args.seeds} seed(s), {args.steps} steps")
    print(f"{'method':<16} {'mean':>7} {'std':>7}")
    for method, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{method:<16} {statistics.mean(accs):7.4f} {spread:7.4f}")
    if "learned linear" in weights:
        print("\nlearned linear weights (last seed): " +
              ", ".join(f"{t} {w:.3f}" for t, w in zip(TASKS, weights["learned linear"].tolist())))
    if "module-aware" in weights:
        print("module-aware weights (last seed), rows = auxiliary tasks, columns = shared tensors:")
        for task, row in zip(TASKS[1:], weights["module-aware"].tolist()):
            print(f"  {task:<11} " + " ".join(f"{w:.3f}" for w in row))
    return results, weights


if __name__ == "__main__":
    main()
