"""Compare every hypergradient mode on a real problem, then tune hyperparameters with a few.

Problem: multinomial logistic regression on scikit-learn's bundled digits (8x8 images, 10
classes; no download) with one learned weight decay per input pixel, φ = log decays (64).
Inner: training cross-entropy + ½ Σⱼ exp(φⱼ) ‖W[:, j]‖². Outer: validation cross-entropy.

1. Solve the inner problem to machine precision (float64, L-BFGS), take the exact
   hypergradient (dense Hessian solve) as the reference, and for every registered mode and a
   sweep of its budget report relative error and cosine against it, Hessian-vector products,
   median wall time and the memory held: by autograd graphs, plus the states that a
   checkpointed unroll (``checkpoint="auto"``, rows of its own) stores between them. Prints
   a table, with a footnote on its columns, and saves a plot of error against time, one line
   per mode (its budgets in order of time) and a dashed line at the reference's time.
2. Run a short hyperparameter optimisation with a few modes; print validation and test loss
   and accuracy before and after.

    python examples/compare_modes.py [--device cuda] [--quick] [--out compare_modes.png]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from tqdm import tqdm

import bilevel
from bilevel import HyperGradient
from bilevel.memory import SavedTensorMemory

# Budgets swept per mode (the option that buys accuracy with work). Modes not listed here,
# such as ones registered later, run once at their defaults.
SWEEPS = {
    "implicit-cg": ("iters", [1, 2, 5, 10, 20, 50, 100]),
    "implicit-neumann": ("iters", [2, 5, 20, 100, 400]),
    "implicit-nystrom": ("rank", [5, 20, 50, 100, 200, 400]),
    "unroll": ("steps", [2, 5, 20, 80]),
    "truncated-unroll": ("truncate", [2, 5, 20, 80]),
}
# Nyström at a fixed rho converges, as the rank grows, to (H + rho I)^-1, not H^-1: at full
# rank its error is the bias of rho. Here the spectrum spreads far below the decays (e^-2), so
# no single rho serves every rank: rho = 0.3 is best at ranks up to about 50 (error ~0.15)
# and its bias dominates above; rho = 0.01 reaches 3e-2 at full rank but amplifies the missed
# directions (error > 1) at every rank below 400 (measured with this script's problem).
FIXED = {"truncated-unroll": {"steps": 100}, "implicit-nystrom": {"rho": 0.3}}
QUICK_SWEEPS = {name: (option, values[:2]) for name, (option, values) in SWEEPS.items()}
# Other ways to run a mode, with the budgets swept: (mode, tag, options, budgets). The
# checkpointed unroll gives the plain unroll's result in memory that grows with √steps;
# forward mode (direction="forward") is left out: with 64 hyperparameters it would carry 64
# tangents, about 64 times the unroll's time (it suits a few learning rates or decays).
VARIANTS = [("unroll", "ckpt=auto", {"checkpoint": "auto"}, [80])]
QUICK_VARIANTS = [("unroll", "ckpt=auto", {"checkpoint": "auto"}, [5])]


def load_data(device: str, seed: int = 0):
    """Standardised digits split into train / validation / test (600 / 600 / 597)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    x = (x - x[:600].mean(0)) / (x[:600].std(0) + 1.0)
    parts = [(x[a:b].to(device), y[a:b].to(device)) for a, b in ((0, 600), (600, 1200), (1200, None))]
    return parts


def make_losses(train, val):
    (x_train, y_train), (x_val, y_val) = train, val

    def inner_loss(params, log_decay):
        weight, bias = params
        penalty = (log_decay.exp() * (weight**2).sum(1)).sum()  # weight is (64 pixels, 10 classes)
        return F.cross_entropy(x_train @ weight + bias, y_train) + 0.5 * penalty

    def outer_loss(params, log_decay):
        weight, bias = params
        return F.cross_entropy(x_val @ weight + bias, y_val)

    return inner_loss, outer_loss


def solve_inner(inner_loss, log_decay, start=None, iters=500):
    """Minimise the (strongly convex) inner loss with L-BFGS, warm-started from ``start``."""
    weight = (
        torch.zeros(64, 10, dtype=log_decay.dtype, device=log_decay.device) if start is None else start[0]
    )
    bias = torch.zeros(10, dtype=log_decay.dtype, device=log_decay.device) if start is None else start[1]
    params = [weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()]
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=iters,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = inner_loss(params, log_decay.detach())
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(p.detach().requires_grad_() for p in params)


def evaluate(params, data):
    x, y = data
    logits = x @ params[0] + params[1]
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()


# Timing: a row's time is the median of REPEATS calls, of REPEATS_SLOW where the first timed
# call takes over SLOW_CALL seconds (they vary less, and dominate the runtime), of one with
# --quick. A first call, under the memory meter, gives the row's result and memory and is left
# out of the timing (it warms caches, and the meter's hooks slow it down).
REPEATS, REPEATS_SLOW, SLOW_CALL = 5, 3, 0.05
REFERENCE = "implicit-exact"  # the mode every other is measured against


def time_mode(hg, args, repeats):
    """A first call's result and the memory it held (the peak of what its autograd graphs
    saved, plus the segment starts that a checkpointed unroll stores outside them), then the
    median seconds of up to ``repeats`` more calls."""
    with SavedTensorMemory() as meter:
        grad = hg.compute(*args)  # a fresh mode's result (Nyström draws new columns each call)
    held = meter.peak + hg.stats.extra.get("checkpoint_bytes", 0)
    times = []
    while len(times) < repeats:
        start = time.perf_counter()
        hg.compute(*args)
        times.append(time.perf_counter() - start)
        if times[0] > SLOW_CALL:
            repeats = min(repeats, REPEATS_SLOW)
    return grad, statistics.median(times), held


def compare(args, inner_loss, outer_loss, params, log_decay):
    exact = HyperGradient(REFERENCE, max_params=1000).compute(inner_loss, outer_loss, params, log_decay)
    sweeps = QUICK_SWEEPS if args.quick else SWEEPS
    jobs = []
    for mode in bilevel.available_modes():
        option, values = sweeps.get(mode, (None, [None]))
        for value in values:
            options = dict(FIXED.get(mode, {}))
            if mode == REFERENCE:
                options["max_params"] = 1000
            if option is not None:
                options[option] = value
            if mode in ("unroll", "truncated-unroll"):
                options["lr"] = args.inner_lr
            jobs.append((mode, option, value, options, mode))
    for mode, tag, extra, values in QUICK_VARIANTS if args.quick else VARIANTS:
        option = sweeps[mode][0]
        for value in values:
            options = {**FIXED.get(mode, {}), "lr": args.inner_lr, option: value, **extra}
            jobs.append((mode, option, value, options, f"{mode} ({tag})"))
    rows = []
    for mode, option, value, options, line in tqdm(jobs, desc="modes x budgets", leave=False, disable=None):
        hg = HyperGradient(mode, **options)
        with bilevel_quiet():
            grad, seconds, graph_bytes = time_mode(
                hg, (inner_loss, outer_loss, params, log_decay), 1 if args.quick else REPEATS
            )
        error = float((grad - exact).norm() / exact.norm())
        cosine = float(F.cosine_similarity(grad.flatten(), exact.flatten(), dim=0))
        budget = f"{option}={value}" if option else "defaults"
        if line != mode:  # a variant: its tag
            budget += f",{line[len(mode) + 2 : -1]}"
        rows.append((mode, budget, error, cosine, hg.stats.hvps, seconds, graph_bytes, line))
    return rows


class bilevel_quiet:
    """Solver warnings are expected at tiny budgets; the table reports them instead."""

    def __enter__(self):
        import warnings

        self._catcher = warnings.catch_warnings()
        self._catcher.__enter__()
        warnings.simplefilter("ignore", bilevel.HypergradientWarning)

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)


def load_note():
    """The machine's load while the timings ran: other processes inflate them all."""
    if not hasattr(os, "getloadavg"):  # not on Windows
        return ""
    return f";\n  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs while they ran"


def print_table(rows, quick=False):
    print(
        f"\n{'mode':<18} {'budget':<18} {'rel. error':>10} {'cosine':>8} {'HVPs':>6} {'time ms':>8} "
        f"{'memory MiB':>10}"
    )
    for mode, budget, error, cosine, hvps, seconds, held_bytes, _ in rows:
        # the reference's own error is 0 (or rounding): it is the reference
        accuracy = f"{'reference':>10} {'-':>8}" if mode == REFERENCE else f"{error:10.2e} {cosine:8.4f}"
        print(f"{mode:<18} {budget:<18} {accuracy} {hvps:6d} {seconds * 1e3:8.1f} {held_bytes / 2**20:10.2f}")
    timing = (
        "one call (--quick)"
        if quick
        else f"median of {REPEATS} calls ({REPEATS_SLOW} where a call takes over {SLOW_CALL * 1e3:.0f} ms)"
    )
    print(
        f"""
rel. error, cosine: against {REFERENCE} (a dense Hessian solve), the reference.
time ms: {timing}, after one untimed call{load_note()}.
HVPs: Hessian-vector products that the mode counts (stats.hvps; implicit-exact makes P of
  them to form the Hessian, implicit-neumann's include 10 power iterations). unroll and
  truncated-unroll count none: they backpropagate through the inner steps, so their
  second-order terms come out of that one backward pass; penalty uses first gradients only.
memory MiB: peak of what the call's autograd graphs held (tensors saved for backward, each
  storage once: bilevel.memory.SavedTensorMemory), plus, for ckpt=auto, the segment-start
  states it stores outside the graph. Implicit modes hold one graph of the inner gradient
  whatever their budget; unrolled modes one per step that carries the graph."""
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = dict.fromkeys(r[7] for r in rows if r[0] != REFERENCE)
    for i, line in enumerate(lines):
        # sorted by time: budgets that buy nothing (CG past convergence) or timing noise
        # would otherwise send the line back and forth
        points = sorted((r[5] * 1e3, r[2]) for r in rows if r[7] == line)
        ax.plot(*zip(*points), marker="osD^v"[i // 10 % 5], label=line)  # 10 colours, then a new marker
    # the reference's error is 0, off a log axis: mark its cost instead
    for r in rows:
        if r[0] == REFERENCE:
            ax.axvline(
                r[5] * 1e3, color="k", linestyle="--", linewidth=1, label=f"{REFERENCE} (reference): its time"
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="wall time per hypergradient (ms, median)",
        ylabel=f"relative error vs {REFERENCE}",
        title="Hypergradient accuracy vs cost (digits, 64 log decays)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved plot to {path}")


def tune(args, modes, inner_loss, outer_loss, data):
    """Adam on the log decays, re-solving the inner problem (warm-started) every outer step."""
    train, val, test = data
    print(f"\nhyperparameter optimisation: {args.outer_steps} outer steps of Adam(lr={args.outer_lr})")
    print(f"{'mode':<18} {'val loss':>17} {'val acc':>15} {'test loss':>17} {'test acc':>15} {'time s':>7}")
    for mode in modes:
        log_decay = torch.full(
            (64,), args.init_log_decay, dtype=torch.float64, device=args.device, requires_grad=True
        )
        outer_opt = torch.optim.Adam([log_decay], lr=args.outer_lr)
        hg = HyperGradient(mode, **FIXED.get(mode, {}), **({"lr": args.inner_lr} if "unroll" in mode else {}))
        params = solve_inner(inner_loss, log_decay)
        before = evaluate(params, val) + evaluate(params, test)
        start = time.perf_counter()
        for _ in tqdm(range(args.outer_steps), desc=mode, leave=False, disable=None):
            outer_opt.zero_grad()
            with bilevel_quiet():
                hg.backward(inner_loss, outer_loss, params, log_decay)
            outer_opt.step()
            params = solve_inner(inner_loss, log_decay, start=params, iters=50)
        after = evaluate(params, val) + evaluate(params, test)
        print(
            f"{mode:<18} {before[0]:7.4f} -> {after[0]:.4f} {before[1]:6.3f} -> {after[1]:.3f} "
            f"{before[2]:7.4f} -> {after[2]:.4f} {before[3]:6.3f} -> {after[3]:.3f} "
            f"{time.perf_counter() - start:7.1f}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    parser.add_argument("--out", default="compare_modes.png", help="where to save the plot")
    parser.add_argument("--outer-steps", type=int, default=30)
    parser.add_argument("--outer-lr", type=float, default=0.2)
    parser.add_argument("--inner-lr", type=float, default=0.5, help="SGD step of the unrolled modes")
    parser.add_argument("--init-log-decay", type=float, default=-2.0)
    parser.add_argument("--tune-modes", default="implicit-cg,implicit-neumann,implicit-nystrom")
    args = parser.parse_args(argv)
    if args.quick:
        args.outer_steps = 3
    torch.manual_seed(0)

    data = load_data(args.device)
    inner_loss, outer_loss = make_losses(data[0], data[1])
    log_decay = torch.full(
        (64,), args.init_log_decay, dtype=torch.float64, device=args.device, requires_grad=True
    )
    params = solve_inner(inner_loss, log_decay)
    print(
        f"digits: 600 train / 600 val / 597 test; P = {sum(p.numel() for p in params)} parameters, "
        f"64 hyperparameters; torch {torch.__version__} on {args.device}"
    )
    rows = compare(args, inner_loss, outer_loss, params, log_decay)
    print_table(rows, args.quick)
    plot(rows, args.out)
    tune(args, [m for m in args.tune_modes.split(",") if m], inner_loss, outer_loss, data)
    return rows


if __name__ == "__main__":
    main()
