"""Tune a transformer's weight decay by hypergradients through a fused attention kernel.

A two-layer transformer (d_model 32, 4 heads of 8 dimensions, pre-LayerNorm, no biases)
classifies sequences of 8 random 8-dimensional tokens into 4 classes; the labels come from a
random teacher of the same shape, and 25% of the 96 training labels are replaced by a wrong
class, so the student overfits without regularisation. Each weight tensor has its own log
weight decay (11 hyperparameters). The attention is ``F.scaled_dot_product_attention`` on
4-D ``(batch, heads, tokens, head_dim)`` inputs with equal head dimensions, for which PyTorch
on the CPU takes its flash kernel (in float32 and float64 alike): that kernel has a first
derivative but no double backward, so every Hessian product of the usual implicit modes fails.

The script
1. shows that ``HyperGradient("implicit-cg")`` (autograd products) raises
   ``NoDoubleBackwardError`` on this model;
2. checks, at one point, the finite-difference hypergradient of the flash model
   (``hvp="finite-difference"``) against the autograd hypergradient of the same model with
   the attention written out by hand, ``softmax(QKᵀ/√d)V`` (twice differentiable): the two
   attentions agree to rounding, so the difference is that of the product rule;
3. tunes the 11 log decays for a number of outer steps (Adam on the hypergradient; between
   outer steps the inner problem is re-solved approximately by Adam, warm-started, as in
   README's training loop) and prints the validation loss and accuracy over outer steps.

Runs in float64 (the CPU flash kernel serves float64 too, and the check is then sharp).

    python examples/attention_hpo.py [--outer-steps 25] [--inner-steps 40] [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel import HyperGradient
from bilevel.errors import NoDoubleBackwardError

TOKENS, FEATURES, D_MODEL, HEADS, LAYERS, CLASSES, HIDDEN = 8, 8, 32, 4, 2, 4, 64
DTYPE = torch.float64
TEACHER_SCALE, TRAIN = 1.0, 256
#: CG on (H + damping·I) x = ∂g/∂θ: the inner problem is non-convex and solved approximately, and
#: the damping keeps the system positive definite (with 0.05 CG met negative curvature, and its
#: result became sensitive to the products' rounding: 2e-3 between the two product rules)
SOLVER: dict[str, Any] = {"iters": 20, "tol": 1e-8, "damping": 1.0}
#: a smaller step than the default ∛ε: this model's third derivatives are large against its
#: Hessian, so the truncation error c² dominates at c = 6e-6 (float64)
SMALL_STEP = 1e-7

Params = dict[str, Tensor]
Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch's fused kernel (the CPU flash kernel for these 4-D, equal-head-dim inputs)."""
    return F.scaled_dot_product_attention(q, k, v)


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same attention written out, twice differentiable: softmax(QKᵀ/√d)V."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def attention_kernel(dtype: torch.dtype = DTYPE) -> str:
    """The backward node of ``flash_attention`` for this model's shapes (which kernel ran)."""
    q = torch.randn(2, HEADS, TOKENS, D_MODEL // HEADS, dtype=dtype, requires_grad=True)
    return type(flash_attention(q, q, q).grad_fn).__name__


# ----------------------------------------------------------------------------- model, data
def init_params(seed: int, scale: float = 1.0) -> Params:
    g = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> Tensor:
        return scale * torch.randn(*shape, generator=g, dtype=DTYPE) / math.sqrt(shape[-1])

    params = {"embed": weight(D_MODEL, FEATURES), "pos": 0.1 * weight(TOKENS, D_MODEL)}
    for i in range(LAYERS):
        params |= {
            f"{i}.qkv": weight(3 * D_MODEL, D_MODEL),
            f"{i}.out": weight(D_MODEL, D_MODEL),
            f"{i}.up": weight(HIDDEN, D_MODEL),
            f"{i}.down": weight(D_MODEL, HIDDEN),
        }
    return params | {"head": weight(CLASSES, D_MODEL)}


def forward(params: Params, x: Tensor, attention: Attention) -> Tensor:
    """Logits of a pre-LayerNorm transformer encoder, mean-pooled over tokens."""
    batch, head_dim = x.shape[0], D_MODEL // HEADS
    h = x @ params["embed"].T + params["pos"]
    for i in range(LAYERS):
        a = F.layer_norm(h, (D_MODEL,))
        qkv = (a @ params[f"{i}.qkv"].T).view(batch, TOKENS, 3, HEADS, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        mixed = attention(q, k, v).transpose(1, 2).reshape(batch, TOKENS, D_MODEL)
        h = h + mixed @ params[f"{i}.out"].T
        h = h + F.gelu(F.layer_norm(h, (D_MODEL,)) @ params[f"{i}.up"].T) @ params[f"{i}.down"].T
    return F.layer_norm(h, (D_MODEL,)).mean(1) @ params["head"].T


def make_data(train: int, val: int, noise: float, seed: int = 0) -> tuple[tuple[Tensor, Tensor], ...]:
    g = torch.Generator().manual_seed(seed)
    teacher = init_params(seed + 100, scale=TEACHER_SCALE)
    x = torch.randn(train + val, TOKENS, FEATURES, generator=g, dtype=DTYPE)
    with torch.no_grad():
        y = forward(teacher, x, math_attention).argmax(1)
    y_train = y[:train].clone()
    flipped = torch.rand(train, generator=g) < noise
    y_train[flipped] = (
        y_train[flipped] + torch.randint(1, CLASSES, (train,), generator=g)[flipped]
    ) % CLASSES
    return (x[:train], y_train), (x[train:], y[train:])


def make_losses(
    attention: Attention, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]
) -> tuple[Callable[[Params, Params], Tensor], Callable[[Params, Params], Tensor]]:
    (x, y), (xv, yv) = train, val

    def inner_loss(params: Params, log_decay: Params) -> Tensor:  # f(θ, φ)
        decay = sum((log_decay[k].exp() * params[k].square()).sum() for k in params)
        return F.cross_entropy(forward(params, x, attention), y) + 0.5 * decay

    def outer_loss(params: Params, log_decay: Params) -> Tensor:  # g(θ, φ)
        return F.cross_entropy(forward(params, xv, attention), yv)

    return inner_loss, outer_loss


def train_inner(
    inner_loss: Callable, params: Params, log_decay: Params, opt: torch.optim.Optimizer, steps: int
):
    fixed = {k: v.detach() for k, v in log_decay.items()}
    for _ in range(steps):
        opt.zero_grad()
        inner_loss(params, fixed).backward()
        opt.step()


def flat(tree: Params) -> Tensor:
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def relative_difference(a: Params, b: Params) -> float:
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


# ----------------------------------------------------------------------------- the script
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--outer-steps", type=int, default=25)
    parser.add_argument("--inner-steps", type=int, default=40, help="Adam steps between outer steps")
    parser.add_argument("--warmup", type=int, default=400, help="Adam steps before the first outer step")
    parser.add_argument("--outer-lr", type=float, default=0.3)
    parser.add_argument("--quick", action="store_true", help="a smoke test (tests/test_examples.py)")
    args = parser.parse_args(argv)
    if args.quick:
        args.outer_steps, args.inner_steps, args.warmup = 3, 20, 100
    start = time.perf_counter()

    train, val = make_data(train=TRAIN, val=512, noise=0.3)
    flash_inner, flash_outer = make_losses(flash_attention, train, val)
    math_inner, math_outer = make_losses(math_attention, train, val)
    params = {k: v.requires_grad_() for k, v in init_params(seed=1).items()}
    log_decay = {k: torch.tensor(-6.0, dtype=DTYPE, requires_grad=True) for k in params}
    inner_opt = torch.optim.Adam(params.values(), lr=1e-3)
    train_inner(flash_inner, params, log_decay, inner_opt, args.warmup)

    kernel = attention_kernel()
    print(f"attention kernel ({DTYPE}, 4-D inputs, head dim {D_MODEL // HEADS}): {kernel}")

    # 1. autograd products need the flash kernel's double backward
    try:
        HyperGradient("implicit-cg", **SOLVER).compute(flash_inner, flash_outer, params, log_decay)
        error = ""
    except NoDoubleBackwardError as e:
        error = str(e).splitlines()[0]
    print(f"autograd products on the flash model: NoDoubleBackwardError: {error or '(not raised)'}")

    # 2. finite-difference products (flash) against autograd products (math attention)
    hg = HyperGradient("implicit-cg", hvp="finite-difference", **SOLVER)
    fd = hg.compute(flash_inner, flash_outer, params, log_decay)
    exact = HyperGradient("implicit-cg", **SOLVER).compute(math_inner, math_outer, params, log_decay)
    agreement = relative_difference(fd, exact)
    with torch.no_grad():
        attention_gap = relative_difference(
            {"o": forward(params, val[0], flash_attention)}, {"o": forward(params, val[0], math_attention)}
        )
    small = HyperGradient("implicit-cg", hvp="finite-difference", fd_eps=SMALL_STEP, **SOLVER)
    agreement_small = relative_difference(small.compute(flash_inner, flash_outer, params, log_decay), exact)
    print(
        f"the two models' logits differ by {attention_gap:.1e}; finite-difference hypergradient (flash) "
        f"vs autograd (math attention), relative:\n  default fd_eps {hg.stats.extra['fd_eps']:.1e}: "
        f"{agreement:.1e}\n  fd_eps {SMALL_STEP:.0e}: {agreement_small:.1e}\n"
        f"  ({hg.stats.extra['gradient_evaluations']} gradient evaluations for {hg.stats.hvps} products "
        "and the mixed product)"
    )

    # 3. tune the log decays
    outer_opt = torch.optim.Adam(log_decay.values(), lr=args.outer_lr)
    history = []
    columns = ("outer step", "val loss", "val acc", "train acc", "mean log decay", "CG")
    print("\n" + " ".join(f"{c:>{w}}" for c, w in zip(columns, (10, 9, 8, 9, 14, 10))))
    for step in range(args.outer_steps + 1):
        with torch.no_grad():
            logits = forward(params, val[0], flash_attention)
            val_loss = float(F.cross_entropy(logits, val[1]))
            val_acc = float((logits.argmax(1) == val[1]).double().mean())
            train_acc = float(
                (forward(params, train[0], flash_attention).argmax(1) == train[1]).double().mean()
            )
        mean_decay = float(torch.stack([v.detach() for v in log_decay.values()]).mean())
        history.append((step, val_loss, val_acc, mean_decay))
        if step == args.outer_steps:
            print(f"{step:10d} {val_loss:9.4f} {val_acc:8.3f} {train_acc:9.3f} {mean_decay:14.2f}")
            break
        outer_opt.zero_grad()
        hg.backward(flash_inner, flash_outer, params, log_decay)
        outer_opt.step()
        stopped = "neg. curv." if hg.stats.breakdown else f"{hg.stats.residual:.0e}"
        print(f"{step:10d} {val_loss:9.4f} {val_acc:8.3f} {train_acc:9.3f} {mean_decay:14.2f} {stopped:>10}")
        train_inner(flash_inner, params, log_decay, inner_opt, args.inner_steps)
    decays = ", ".join(f"{k} {float(v.detach()):.1f}" for k, v in log_decay.items())
    seconds = time.perf_counter() - start
    print(f"\nlearned log decays: {decays}\n{seconds:.1f} s")
    return {
        "kernel": kernel,
        "error": error,
        "agreement": agreement,
        "agreement_small_step": agreement_small,
        "attention_gap": attention_gap,
        "history": history,
        "log_decay": {k: float(v.detach()) for k, v in log_decay.items()},
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
