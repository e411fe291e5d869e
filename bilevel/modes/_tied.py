"""The unrolled modes with tied tensors (the same tensors as params and hparams: MAML).

The inner run starts at θ_0,i = φ_j for each tie (``BilevelProblem.tied``, {j: i}), so by the
chain rule through the start ``dg/dφ_j = ∂g/∂φ_j + dg/dθ_0,i``: the reverse runs add the
adjoint of θ_0 to φ's gradient (θ_0 is a separate leaf with φ_j's value), forward mode seeds
the tangent of θ_0,i along φ_j's entries, and the compiled program starts at φ itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._src.problem import BilevelProblem
from .._src.typing import Tensors

__all__ = ["add_start", "check_tied", "start_tangent", "tied_start"]


def check_tied(problem: BilevelProblem, cut_steps: int, update_params: bool) -> None:
    """Refuse what a tie cannot mean: a truncation (θ_0 would be cut from the graph, and the
    init's hypergradient silently zero) and ``update_params`` (the tensor would be both the
    init and the trained weights)."""
    if not problem.tied:
        return
    if cut_steps:
        raise ValueError(
            f"params and hparams share tensors (the initialisation as a hyperparameter), but "
            f"the first {cut_steps} steps are cut from the graph, so the hypergradient of the "
            "init would be zero: use mode 'unroll', or truncate=steps"
        )
    if update_params:
        raise ValueError(
            "update_params=True with tensors shared by params and hparams would write the "
            "trained weights into the init (the hyperparameter): pass a separate copy as "
            "params to keep training weights, or drop update_params and update the init with "
            "an outer optimizer"
        )


def add_start(problem: BilevelProblem, grads: Sequence[Tensor], start: Sequence[Tensor | None]) -> Tensors:
    """φ̄ with the adjoint of θ_0 added at each tie: ``φ̄_j + θ̄_0,i`` (``start``: θ̄_0, None
    where unreached; empty when the problem has no tie)."""
    total = list(grads)
    for j, i in problem.tied.items():
        g = start[i] if i < len(start) else None
        if g is not None:
            total[j] = total[j] + g
    return tuple(total)


def start_tangent(problem: BilevelProblem, entry: tuple[int, int]) -> list[Tensor | None]:
    """dθ_0/dφ along hparams entry ``(a, k)`` (φ_a's flat entry k): e_k at θ_i if φ_a is tied
    to θ_i, else nothing (None for each θ leaf)."""
    a, k = entry
    tangents: list[Tensor | None] = [None] * len(problem.theta0)
    if a in problem.tied:
        p = problem.phi0[a]
        unit = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        unit[k] = 1.0
        tangents[problem.tied[a]] = unit.reshape(p.shape)
    return tangents


def tied_start(problem: BilevelProblem, theta: Tensors, phi: Tensors) -> Tensors:
    """θ_0 for a pure program of φ: φ_j itself at each tie, the given θ elsewhere."""
    source = {i: j for j, i in problem.tied.items()}
    return tuple(phi[source[i]] if i in source else t for i, t in enumerate(theta))
