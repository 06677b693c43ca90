"""Each script in examples/ runs (a few steps) and shows the SIGReg values it promises."""

import runpy
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
