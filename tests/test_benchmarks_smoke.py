"""Smoke tests of the benchmark scripts: each runs in its quick mode and writes sane JSON."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, json_path: Path, *args: str, timeout: float = 60) -> dict:
    """Run ``benchmarks/<script> --quick --json json_path *args``; return the parsed JSON.

    The quick runs take a few seconds; the timeout leaves room for a busy machine.
    """
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(json_path),
           *args]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--quick" in done.stdout  # the command line is echoed at the top
    return json.loads(json_path.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_auto_weight_cost_quick(tmp_path):
    res = run_quick("auto_weight_cost.py", tmp_path / "auto.json", "--threads", "1")
    assert {"command", "config", "env", "provenance", "step_time", "elapsed_s"} <= set(res)
    ratios = res["step_time"]["ratios"]
    assert set(ratios) == {"weak", "strong", "vicreg"}
    for r in ratios.values():
        assert positive(r["median"]) and r["ci95_low"] <= r["median"] <= r["ci95_high"]
    assert len(res["step_time"]["arms"]["weak-auto"]["times_ms"]) == res["config"]["steps"]


def test_overhead_quick(tmp_path):
    res = run_quick("overhead.py", tmp_path / "overhead.json")
    assert {"command", "config", "env", "step_time", "weak_memory", "elapsed_s"} <= set(res)

    arms = res["step_time"]["arms"]
    assert set(arms) == {"none", "weak", "strong"}
    for name, arm in arms.items():
        assert positive(arm["median_ms"]) and arm["q25_ms"] <= arm["q75_ms"], name
        assert len(arm["times_ms"]) == res["config"]["steps"]
        assert all(positive(t) for t in arm["times_ms"])
    assert positive(arms["weak"]["hooks_alone_ms"])
    assert positive(arms["strong"]["hooks_alone_ms"])

    ratios = res["step_time"]["ratios"]
    assert set(ratios) == {"weak", "strong"}
    for r in ratios.values():
        assert all(positive(r[k]) for k in ("median", "ci95_low", "ci95_high", "target"))
        assert r["ci95_low"] <= r["median"] <= r["ci95_high"]
        assert isinstance(r["pass"], bool)

    rows = res["weak_memory"]
    assert {row["K"] for row in rows} == {res["config"]["sketch_dim"], None}  # sketch and full
    for row in rows:
        assert positive(row["median_ms"]) and positive(row["peak_mib"]), row


def test_throughput_quick(tmp_path):
    path = tmp_path / "throughput.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick",
           "--workers", "1", "--json", str(path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=40, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--quick --workers 1" in done.stdout.splitlines()[0]  # command line comes first
    res = json.loads(path.read_text())
    assert {"command", "config", "env", "train_step", "augment_only", "target", "pass",
            "elapsed_s"} <= set(res)
    assert isinstance(res["pass"], bool) and positive(res["target"])
    rounds = res["config"]["rounds"]
    for phase in ("train_step", "augment_only"):
        for arm in ("ours", "dataloader"):
            r = res[phase][arm]
            assert positive(r["median_img_s"]), (phase, arm)
            assert len(r["per_round_img_s"]) == rounds
            assert all(positive(v) for v in r["per_round_img_s"])
        ratio = res[phase]["ratio"]
        assert all(positive(ratio[k]) for k in ("median", "min", "max")), phase
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
        assert len(ratio["per_round"]) == rounds


def test_regularizer_cost_quick(tmp_path):
    res = run_quick("regularizer_cost.py", tmp_path / "cost.json", "--breakdown")
    breakdown = res["breakdown_us_per_step"]
    assert set(breakdown) == {"none", "weak", "strong", "vicreg"}
    # The sketch draw is a cost of weak and strong alone.
    assert "aten::normal_" not in breakdown["none"] and breakdown["weak"]["aten::normal_"] > 0
    assert set(res["arms"]) == {"none", "weak", "strong", "vicreg"}
    assert set(res["ratios"]) == {"weak", "strong", "vicreg"}
    for arm in res["arms"].values():
        assert len(arm["times_ms"]) == res["config"]["rounds"]
        assert positive(arm["median_ms"]) and all(positive(t) for t in arm["times_ms"])
    for r in res["ratios"].values():
        assert all(positive(r[k]) for k in ("median", "ci95_low", "ci95_high"))
        assert r["ci95_low"] <= r["median"] <= r["ci95_high"]
    monitor = res["monitor"]
    assert positive(monitor["ms_per_measurement"]) and monitor["every"] == 25
    assert 0 < monitor["share_of_none_step"] < 10


def run_gpu_script(out: Path, env: dict[str, str], timeout: float) -> str:
    """``benchmarks/gpu_cost.sh out`` with ``env``; returns what it printed."""
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_cost.sh"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_gpu_cost_script_on_cpu(tmp_path):
    """The device-call script's plumbing at tiny sizes: parts leave their files in OUT (at most
    7, flat: the device tool returns 8), the summary reads them, and a part that has no time
    left is skipped and reported as not measured."""
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "IMAGES": "128", "PARTS": "cost epochs",
           "SCRATCH": str(tmp_path / "scratch"), "PYTHON": sys.executable,
           "EXTRA": "num_test=32 batch_size=32 model.dim=16 model.depth=1 model.heads=2"}
    run_gpu_script(out, env, timeout=300)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["cost.json", "epochs.jsonl", "log.txt", "summary.md"]
    epochs = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    assert [e["arm"] for e in epochs] == ["none", "weak", "strong"]
    assert all(e["epoch"] == 2 and e["images"] == 128 and positive(e["full_epoch_s"])
               for e in epochs)
    summary = (out / "summary.md").read_text()
    assert "| cost | weak |" in summary and "| eager epoch | strong |" in summary
    assert "| overhead_amp | - | not measured" in summary  # not among PARTS
    assert (out / "log.txt").read_text().count("== ") >= 2

    skipped = tmp_path / "skipped"
    printed = run_gpu_script(skipped, {**env, "BUDGET_S": "5", "PARTS": "compiled"}, timeout=60)
    assert "== compiled: skipped" in printed
    assert "| epochs | - | not measured" in (skipped / "summary.md").read_text()


def test_import_time_quick(tmp_path):
    res = run_quick("import_time.py", tmp_path / "import_time.json", timeout=600)
    assert set(res["median_s"]) == {"python", "import torch", "import sigreg", "sigreg --help"}
    assert all(positive(t) for t in res["median_s"].values())
    assert positive(res["ratio_to_import_torch"]["import sigreg"]["median"])
    assert res["heavy_modules_loaded"]["import sigreg"] == []  # no dynamo, toolkit, matplotlib
    assert res["heavy_modules_loaded"]["sigreg --help"] == ["sigreg.train"]  # not the trainer
    assert {"sigreg", "commit", "dirty", "torch", "threads", "date"} <= set(res["provenance"])
