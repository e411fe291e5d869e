"""Tensors passed as both params and hparams: the initialisation as a hyperparameter (MAML).

A params leaf θ_i that is the very tensor of a hparams leaf φ_j is *tied*: the unrolled modes
start the inner run at θ_0,i = φ_j, so ``dg/dφ_j = ∂g/∂φ_j + dg/dθ_0,i`` (the chain rule
through the start). A module passed on both sides (or a submodule of the params module
passed as hparams) is bound to θ when the closures call it; their hparams argument holds
that module's φ tensors as a name -> tensor dict (the init), since one module object cannot
be evaluated at two points at once.
"""

from __future__ import annotations

from .pytree import Tree
from .typing import Tensors

__all__ = ["IMAML_RECIPE", "find_ties", "hparams_modules_tied", "tied_refusal"]

IMAML_RECIPE = (
    "iMAML's proximal formulation instead: params a separate copy θ, the proximal term "
    "‖θ − φ‖²·λ/2 in the inner loss, hparams the init φ as a dict:\n"
    "    theta = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}\n"
    "    inner = lambda p, init: task_loss(p) + lam / 2 * sum(((p[k] - init[k]) ** 2).sum() for k in p)\n"
    "then train theta to a minimiser of inner and call compute(inner, outer, theta, "
    "dict(model.named_parameters())), task_loss(p) evaluating the model at p with "
    "torch.func.functional_call(model, p, (x,))"
)


def tied_refusal(mode: str) -> str:
    """The message of a mode that cannot start the inner run at the hparams."""
    return (
        f"mode {mode!r} got the same tensors as params and hparams (the initialisation as a "
        "hyperparameter, MAML); only the unrolled modes ('unroll', 'truncated-unroll' with "
        "truncate=steps) differentiate through the start of the inner run. The implicit "
        "modes differentiate the inner solution, which does not depend on where it starts: use "
        + IMAML_RECIPE
    )


def find_ties(theta: Tensors, phi: Tensors) -> dict[int, int]:
    """{hparams index j: params index i} for each φ_j that is the tensor θ_i."""
    where = {id(t): i for i, t in enumerate(theta)}
    return {j: where[id(t)] for j, t in enumerate(phi) if id(t) in where}


def hparams_modules_tied(hparams: Tree, ties: dict[int, int]) -> bool:
    """Whether the hparams' modules are tied (then they are not rebound, and the closures see
    them as name -> tensor dicts). A module must be tied whole or not at all, and then every
    hparams module must be: otherwise some module would be bound to two points at once."""
    counts = [sum(j in ties for j in range(s.offset, s.offset + len(s.names))) for s in hparams.modules]
    for slot, n in zip(hparams.modules, counts):
        if 0 < n < len(slot.names):
            raise ValueError(
                f"hparams module {type(slot.module).__name__} shares {n} of its {len(slot.names)} "
                "parameters with params: a module is either the initialisation (all its "
                "parameters in params too, as with params=model, hparams=model) or not at all; "
                "pass the shared submodule itself as hparams (hparams=model.layer), or its "
                "tensors in a dict"
            )
    tied = [n > 0 for n in counts]
    if any(tied) and not all(tied):
        raise ValueError(
            "hparams holds a module tied to params (an initialisation, seen by the closures as "
            "a name -> tensor dict) and a module that is not: the closures could not call the "
            "latter consistently. Pass the untied module's tensors as a dict "
            "(dict(module.named_parameters())) and evaluate it with torch.func.functional_call"
        )
    return any(tied)
