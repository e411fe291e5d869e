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


def test_data_hypercleaning_quick(capsys):
    result = load("data_hypercleaning").main(["--quick"])
    assert result["auc"] > 0.6  # even three outer steps start to separate clean from corrupted
    assert result["learned"] >= result["noisy"] - 0.01
    assert "ROC AUC" in capsys.readouterr().out
