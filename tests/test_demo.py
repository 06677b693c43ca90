"""The demo pipeline end to end on a tiny synthetic configuration."""

import json

import torch

from sigreg.train import demo
from sigreg.train.cli import run_comparison

TINY = ["dataset=synthetic", "num_train=64", "num_test=32", "epochs=2", "batch_size=32",
        "model.depth=3", "model.width=16", "monitor_every=1"]


def test_demo_comparison_writes_report_curves_results(tmp_path, capsys):
    torch.set_num_threads(1)
    res = run_comparison(demo.PRESETS, TINY, tmp_path, progress=False)
    assert set(res) == set(demo.PRESETS)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    for name, r in saved.items():
        assert r["epochs"] == 2 and 0.0 <= r["final_test_acc"] <= 1.0
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert r["final_test_acc"] == [x for x in rows if x["kind"] == "epoch"][-1]["test_acc"]
    report = (tmp_path / "report.md").read_text()
    assert "| fmnist-mlp |" in report and "| none | strong | weak |" in report
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
