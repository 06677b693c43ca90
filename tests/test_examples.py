"""Each script in examples/ runs (a few steps) and shows the SIGReg values it promises."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def example(monkeypatch):
    """Load examples/<name>.py (its folder importable, as when run as a script); return main."""
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def load(name: str):
        return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=name)["main"]

    return load


def test_plain_pytorch(example, capsys):
    acc = example("plain_pytorch")(["--epochs", "1", "--max-steps", "20"])
    assert 0.0 <= acc <= 1.0
    assert "SIGReg per layer:" in capsys.readouterr().out


def test_lightning(example, tmp_path):
    pytest.importorskip("lightning", reason="needs the [lightning] extra")
    metrics = example("lightning_trainer")(["--epochs", "1", "--limit-batches", "30",
                                                   "--out", str(tmp_path)])
    assert "val_acc" in metrics and "sigreg/loss/mlp.layers.4" in metrics
    header = next(tmp_path.glob("*/metrics.csv")).read_text().splitlines()[0]
    assert "sigreg/eff_dim/mlp.layers.0" in header


def test_hf_trainer(example, tmp_path, capsys):
    pytest.importorskip("transformers", reason="needs the [transformers] extra")
    pytest.importorskip("accelerate", reason="needs the [transformers] extra (accelerate)")
    metrics = example("hf_trainer")(["--max-steps", "25", "--out", str(tmp_path)])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert "sigreg/eff_dim/vit.layers.3" in capsys.readouterr().out


# Runs a script with the [train] extra's modules absent, as after `pip install sigreg`: a None
# in sys.modules makes `import numpy` fail and importlib.util.find_spec("numpy") answer None.
CORE_ONLY = """
import runpy, sys
from pathlib import Path
BLOCKED = ("numpy", "matplotlib", "tqdm")
sys.modules.update(dict.fromkeys(BLOCKED))
script, *sys.argv[1:] = sys.argv[1:]
sys.path.insert(0, str(Path(script).parent))
runpy.run_path(script, run_name="__main__")
assert all(sys.modules[m] is None for m in BLOCKED)
"""


def test_plain_pytorch_runs_on_the_core_alone():
    """torch and sigreg only: no numpy (so not the toolkit's data loader), matplotlib, tqdm."""
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent / "src")}
    done = subprocess.run([sys.executable, "-c", CORE_ONLY, str(EXAMPLES / "plain_pytorch.py"),
                           "--epochs", "1", "--max-steps", "5"],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no [train] extra" in done.stdout and "SIGReg per layer:" in done.stdout
