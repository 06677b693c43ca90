"""The demo pipeline end to end on a tiny synthetic configuration."""

import json

import torch

from sigreg.train import demo
from sigreg.train.cli import run_comparison

TINY = ["dataset=synthetic", "num_train=64", "num_test=32", "epochs=2", "batch_size=32",
        "model.depth=3", "model.width=16", "monitor_every=1"]
TINY_VIT = ["dataset=synthetic", "num_train=64", "num_test=32", "epochs=2", "batch_size=32",
            "model.dim=16", "model.depth=1", "model.heads=2", "monitor_every=1"]


def test_demo_runs_the_lead_and_the_control_and_writes_their_reports(tmp_path, capsys):
    torch.set_num_threads(1)
    results = demo.run_demo(tmp_path, {"vit": TINY_VIT, "mlp": TINY})
    assert set(results) == {"vit", "mlp"}
    for group, presets, settings in demo.GROUPS:
        res = results[group]
        assert set(res) == set(presets)
        saved = json.loads((tmp_path / group / "results.json").read_text())
        assert saved == json.loads(json.dumps(res))
        for name, r in saved.items():
            assert r["epochs"] == 2 and r["seed"] == demo.SEED and 0 <= r["final_test_acc"] <= 1
            rows = [json.loads(x) for x in
                    (tmp_path / group / name / "metrics.jsonl").read_text().splitlines()]
            assert r["final_test_acc"] == [x for x in rows if x["kind"] == "epoch"][-1]["test_acc"]
        assert (tmp_path / group / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vit = json.loads((tmp_path / "vit" / "fmnist-vit-5k-weak" / "config.json").read_text())
    assert vit["lr"] == 0.001
    he = json.loads((tmp_path / "mlp" / "fmnist-mlp-d10-he-none" / "config.json").read_text())
    assert he["model_args"]["init"] == "he"
    report = (tmp_path / "mlp" / "report.md").read_text()
    assert "| fmnist-mlp-d10 |" in report and "| fmnist-mlp-d10-he |" in report
    text = demo.summary(results)
    assert "He init (the fix)" in text and text.count(" %,") == 3
    assert "wrote" in capsys.readouterr().out


def test_comparison_with_the_vicreg_baseline_gets_its_column(tmp_path, capsys):
    torch.set_num_threads(1)
    tiny = [s for s in TINY if not s.startswith("epochs=")] + ["epochs=1"]
    res = run_comparison(["fmnist-mlp-none", "fmnist-mlp-vicreg"], tiny, tmp_path, progress=False)
    # Each run's header says what runs: the preset's "5 epochs" is the 1 set here.
    header = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("[1/2] fmnist-mlp-none: "))
    assert "plain SGD, 1 epoch " in header and "5 epochs" not in header
    assert header.endswith("; --set " + " ".join(tiny))
    assert {name: r["sigreg"] for name, r in res.items()} == {
        "fmnist-mlp-none": "none", "fmnist-mlp-vicreg": "vicreg"}
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "| setting | none | strong | weak | vicreg |" in lines
    row = next(line for line in lines if line.startswith("| fmnist-mlp |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["-", "-"] and cells[1] != "-" and cells[4] != "-"
    assert f"{100 * res['fmnist-mlp-vicreg']['final_test_acc']:.2f}" in cells[4]
