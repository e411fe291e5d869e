"""Smoke tests: every example runs top to bottom with a tiny budget."""
import importlib.util
import sys
from pathlib import Path

import pytest

import bilevel

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_compare_modes_quick(tmp_path, capsys):
    rows = load("compare_modes").main(["--quick", "--out", str(tmp_path / "plot.png")])
    assert {row[0] for row in rows} == set(bilevel.available_modes())
    errors = {row[0]: row[2] for row in rows}
    assert errors["implicit-exact"] < 1e-12
    assert min(row[2] for row in rows if row[0] == "implicit-cg") < 0.1
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "hyperparameter optimisation" in out and "implicit-cg" in out


def test_auxiliary_learning_quick(capsys):
    results, weights = load("auxiliary_learning").main(["--quick"])
    assert set(results) == {"single-task", "equal weights", "learned linear", "module-aware"}
    assert all(0.1 < accs[0] <= 1.0 for accs in results.values())
    assert weights["learned linear"].shape == (4,) and weights["module-aware"].shape == (3, 2)
    assert "mean" in capsys.readouterr().out
