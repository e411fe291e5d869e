"""Smoke test: examples/auxiliary_learning.py runs end to end with its tiny budget."""

from pathlib import Path

import pytest
import torch

from problems import load_script

EXAMPLE = Path(__file__).parent.parent / "examples" / "auxiliary_learning.py"


@pytest.mark.slow
def test_auxiliary_learning_example_quick(capsys):
    module = load_script(EXAMPLE, "auxiliary_learning_example")
    results, weights = module.main(["--quick"])
    assert list(results) == ["single-task", "equal weights", "learned linear", "module-aware"]
    assert all(len(accs) == 1 and 0.3 < accs[0] <= 1.0 for accs in results.values())  # chance is 0.1
    linear, module_aware = weights["learned linear"], weights["module-aware"]
    assert linear.shape == (4,) and linear[0] == 1.0 and (linear >= 0).all()
    assert module_aware.shape == (3, 2) and (module_aware >= 0).all()
    assert not torch.allclose(linear[1:], torch.ones(3)) and not torch.allclose(
        module_aware, torch.ones(3, 2)
    )
    out = capsys.readouterr().out
    assert "gain over single-task" in out and "module-aware" in out
