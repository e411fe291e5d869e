"""Writes the bilevel 0.1.0 checkpoints of ``tests/test_checkpoints.py`` (kept in this folder).

Run it with the 0.1.0 package on the path, from outside the repository so that the package
in it is not imported instead::

    cd /tmp && PYTHONPATH=/path/to/bilevel-0.1.0 python /path/to/tests/data/make_checkpoints.py

It writes one checkpoint per case (``HyperGradient.state_dict()`` after a call, through
``torch.save``) and ``expected_0.1.0.pt``: what 0.1.0 computed at the next call, which a
resumed run must reproduce. The problems are defined here, without random numbers, and
imported by the tests.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CG_OPTIONS",
    "NYSTROM_OPTIONS",
    "UNROLL_OPTIONS",
    "cg_problem",
    "nystrom_problem",
    "unroll_problem",
]

HERE = Path(__file__).resolve().parent
DTYPE = torch.float64
CG_OPTIONS: dict[str, Any] = {"warm_start": True, "tol": 1e-10}
UNROLL_OPTIONS: dict[str, Any] = {"steps": 3, "update_params": True, "lr": 0.1, "momentum": 0.9}
NYSTROM_OPTIONS: dict[str, Any] = {"rank": 2, "generator": 7}
Problem = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], Any, Any]


def _data(n: int = 12, p: int = 4) -> tuple[torch.Tensor, ...]:
    """Training and validation data from fixed formulas (the same on every machine)."""
    i = torch.arange(n * p, dtype=DTYPE).reshape(n, p)
    x, y = torch.sin(0.7 * i + 0.3), torch.cos(1.3 * torch.arange(n, dtype=DTYPE))
    xv, yv = torch.cos(0.5 * i[:8] + 0.1), torch.sin(0.9 * torch.arange(8, dtype=DTYPE))
    return x, y, xv, yv


def cg_problem(step: int) -> Problem:
    """Ridge regression with params ``{"linear": nn.Linear(4, 1, bias=False), "offset": scalar}``
    at the inner optimum, hparams ``(log penalty of the weights (4,), of the offset ())``
    drifting with ``step``."""
    x, y, xv, yv = _data()
    lam_w = torch.full((4,), -1.0 + 0.05 * step, dtype=DTYPE, requires_grad=True)
    lam_o = torch.tensor(-0.5 + 0.05 * step, dtype=DTYPE, requires_grad=True)

    def inner(p: dict[str, Any], h: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        residual = p["linear"](x).squeeze(-1) + p["offset"] - y
        return (
            0.5 * (residual**2).mean()
            + 0.5 * (h[0].exp() * p["linear"].weight[0] ** 2).sum()
            + 0.5 * h[1].exp() * p["offset"] ** 2
        )

    def outer(p: dict[str, Any], h: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((p["linear"](xv).squeeze(-1) + p["offset"] - yv) ** 2).mean()

    z = torch.cat([x, torch.ones(len(x), 1, dtype=DTYPE)], dim=1)
    penalty = torch.diag(torch.cat([lam_w.detach(), lam_o.detach().reshape(1)]).exp())
    solution = torch.linalg.solve(z.T @ z / len(z) + penalty, z.T @ y / len(z))
    linear = nn.Linear(4, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        linear.weight.copy_(solution[:4].reshape(1, 4))
    offset = solution[4].clone().requires_grad_()
    return inner, outer, {"linear": linear, "offset": offset}, (lam_w, lam_o)


def unroll_problem() -> Problem:
    """Ridge regression with a weight tensor of shape (4,) starting at zero (the unrolled
    optimizer trains it), hparams the log penalty (4,)."""
    x, y, xv, yv = _data()
    lam = torch.full((4,), -1.0, dtype=DTYPE, requires_grad=True)

    def inner(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (h.exp() * w**2).sum()

    def outer(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((xv @ w - yv) ** 2).mean()

    return inner, outer, torch.zeros(4, dtype=DTYPE, requires_grad=True), lam


def nystrom_problem(step: int) -> Problem:
    """The ridge problem of :func:`unroll_problem` at its inner optimum, hparams drifting."""
    inner, outer, _, lam = unroll_problem()
    x, y, _, _ = _data()
    lam = (lam.detach() + 0.05 * step).requires_grad_()
    w = torch.linalg.solve(x.T @ x / len(x) + torch.diag(lam.detach().exp()), x.T @ y / len(x))
    return inner, outer, w.requires_grad_(), lam


def main() -> None:
    import bilevel

    # 0.1.0 flattened structures in bilevel/_structure.py; later versions have no such module
    if importlib.util.find_spec("bilevel._structure") is None:
        raise SystemExit(f"this imports bilevel from {bilevel.__file__}, not 0.1.0; see the docstring")
    print(f"bilevel {bilevel.__version__} from {bilevel.__file__}")
    expected: dict[str, Any] = {"version": bilevel.__version__}

    hg = bilevel.HyperGradient("implicit-cg", **CG_OPTIONS)
    hg.compute(*cg_problem(0))
    torch.save(hg.state_dict(), HERE / "implicit_cg_warm_start_0.1.0.pt")
    expected["implicit-cg"] = {"next": hg.compute(*cg_problem(1)), "hvps": hg.stats.hvps}

    inner, outer, theta, lam = unroll_problem()
    hg = bilevel.HyperGradient("unroll", **UNROLL_OPTIONS)
    hg.compute(inner, outer, theta, lam)
    torch.save(hg.state_dict(), HERE / "unroll_momentum_0.1.0.pt")
    saved = theta.detach().clone()
    expected["unroll"] = {
        "theta": saved,
        "next": hg.compute(inner, outer, theta, lam),
        "theta_after": theta.detach().clone(),
    }

    hg = bilevel.HyperGradient("implicit-nystrom", **NYSTROM_OPTIONS)
    hg.compute(*nystrom_problem(0))
    torch.save(hg.state_dict(), HERE / "implicit_nystrom_0.1.0.pt")
    expected["implicit-nystrom"] = {"next": hg.compute(*nystrom_problem(1))}

    torch.save(expected, HERE / "expected_0.1.0.pt")
    for path in sorted(HERE.glob("*.pt")):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
