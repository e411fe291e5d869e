"""Every implicit mode and the penalty mode at their defaults: accurate (relative error ≤ 1e-2
against the dense solve) or flagged (``stats.converged`` False, with a warning)?

Problems: the tests' ridge and logistic regressions (float64) and the examples' digits
(compare_modes.py) and data hyper-cleaning problems at their L-BFGS params.

    python benchmarks/defaults.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import bilevel  # noqa: E402
from bilevel import HyperGradient, HypergradientWarning  # noqa: E402


def problems() -> dict[str, tuple[Any, ...]]:
    import penalty

    from problems import logistic, ridge

    made: dict[str, tuple[Any, ...]] = {}
    for name, problem in (("ridge", ridge()), ("logistic", logistic(n=200, p=20))):
        made[name] = (problem.inner_loss, problem.outer_loss, problem.params_star(), problem.hparams)
    for name, build in (("digits", penalty.digits_problem), ("cleaning", penalty.cleaning_problem)):
        inner, outer, solve, phi = build()
        made[name] = (inner, outer, solve(), phi)
    return made


def main(argv: list[str] | None = None) -> list[tuple[str, str, float, bool | None, bool]]:
    modes = [m for m in bilevel.available_modes() if m.startswith("implicit") or m == "penalty"]
    rows = []
    for name, args in problems().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HypergradientWarning)
            reference = HyperGradient("implicit-exact", max_params=2000).compute(*args)
        for mode in modes:
            hg = HyperGradient(mode)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", HypergradientWarning)
                got = hg.compute(*args)
            error = float((got - reference).norm() / reference.norm())
            warned = any(issubclass(w.category, HypergradientWarning) for w in caught)
            flagged = hg.stats.converged is False and warned
            rows.append((name, mode, error, hg.stats.converged, flagged))
            verdict = "accurate" if error <= 1e-2 else ("flagged" if flagged else "SILENTLY WRONG")
            print(f"{name:9s} {mode:18s} {error:9.1e}  converged={hg.stats.converged!s:5s}  {verdict}")
    return rows


if __name__ == "__main__":
    main()
