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


def test_comparison_with_the_vicreg_baseline_gets_its_column(tmp_path):
    torch.set_num_threads(1)
    tiny = [s for s in TINY if not s.startswith("epochs=")] + ["epochs=1"]
    res = run_comparison(["fmnist-mlp-none", "fmnist-mlp-vicreg"], tiny, tmp_path, progress=False)
    assert {name: r["sigreg"] for name, r in res.items()} == {
        "fmnist-mlp-none": "none", "fmnist-mlp-vicreg": "vicreg"}
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "| setting | none | strong | weak | vicreg |" in lines
    row = next(line for line in lines if line.startswith("| fmnist-mlp |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["-", "-"] and cells[1] != "-" and cells[4] != "-"
    assert f"{100 * res['fmnist-mlp-vicreg']['final_test_acc']:.2f}" in cells[4]
