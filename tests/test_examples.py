"""Smoke tests: every example runs top to bottom with a tiny budget."""

from pathlib import Path

import pytest

import bilevel

from problems import load_script

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.slow
def test_compare_modes_quick(tmp_path, capsys):
    rows = load_script(EXAMPLES / "compare_modes.py").main(["--quick", "--out", str(tmp_path / "plot.png")])
    assert {row[0] for row in rows} == set(bilevel.available_modes())
    errors = {row[0]: row[2] for row in rows}
    assert errors["implicit-exact"] < 1e-12
    assert min(row[2] for row in rows if row[0] == "implicit-cg") < 0.1
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "hyperparameter optimisation" in out and "implicit-cg" in out


@pytest.mark.slow
def test_data_hypercleaning_quick(capsys):
    result = load_script(EXAMPLES / "data_hypercleaning.py").main(["--quick"])
    assert result["auc"] > 0.6  # even three outer steps start to separate clean from corrupted
    assert result["learned"] >= result["noisy"] - 0.01
    assert "ROC AUC" in capsys.readouterr().out
