"""benchmarks/gpu_queue.sh, the GPU evidence queue, on the CPU at tiny sizes (a fake
Fashion-MNIST of 320 images, a one-block ViT of width 16): items run in order, a committed
item is skipped by the next slot, OUT holds at most 7 files, results carry provenance, and
missing data is refused in one line. Then its helper's planning and cut runs, without training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_queue
from _fake_datasets import write_fashion_mnist

TINY = "model.dim=16 model.depth=1 model.heads=2 batch_size=32 eval_batch_size=100"
PROVENANCE = {"sigreg", "commit", "torch", "device", "threads", "date"}


def run_queue(out: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_queue.sh"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_queue_runs_in_order_and_the_next_slot_continues(tmp_path):
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", n_train=320, n_test=100)
    done = tmp_path / "done"  # a temporary copy of the committed folder
    shutil.copytree(ROOT / "experiments" / "gpu-queue", done)
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "QUICK": "1",
           "PARTS": "cost", "EXTRA": TINY, "EPOCHS": "2", "MAX_ITEMS": "2",
           "DATA_DIR": str(tmp_path / "data"), "DONE_DIR": str(done),
           "SCRATCH": str(tmp_path / "scratch"),
           "OMP_NUM_THREADS": "1"}  # four training processes share the CPU's cores

    # Slot 1: gpu-cost, then the first ViT item; MAX_ITEMS stops it there.
    out = tmp_path / "slot1"
    done_run = run_queue(out, env)
    printed = done_run.stdout + done_run.stderr
    assert done_run.returncode == 0, printed
    assert printed.index("== gpu-cost (") < printed.index("== vit-full-lr1e-3 (")
    assert "== vit-full-lr1e-3-s1: not run (MAX_ITEMS=2)" in printed
    cost_file = f"gpu-cost-{gpu_queue.src_hash()[:12]}.json"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([cost_file, "vit-full-lr1e-3.jsonl", "queue-log.txt"])
    assert len(files) <= 7  # the device tool returns 8

    cost = json.loads((out / cost_file).read_text())
    assert cost["status"] == "complete" and cost["parts"] == {"cost": "measured"}
    assert {"none", "weak"} <= set(cost["results"]["cost"]["arms"])
    assert PROVENANCE | {"command", "src_hash"} <= set(cost["queue"])
    assert "gpu_queue.sh" in cost["queue"]["command"] and cost["queue"]["device"] == "cpu"

    runs = [json.loads(line) for line in (out / "vit-full-lr1e-3.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in runs] == ["none", "weak", "strong", "vicreg"]
    for r in runs:
        assert r["state"] == "finished" and r["epochs"] == r["epochs_done"] == 2, r
        assert (r["lr"], r["seed"], r["preset"]) == (1e-3, 0, f"fmnist-vit-full-{r['arm']}")
        assert len(r["test_acc"]) == 2 and r["final_test_acc"] == r["test_acc"][-1]
        assert r["best_test_acc"] == max(r["test_acc"])
        assert r["config"]["epochs"] == 2 and r["config"]["model_args"]["dim"] == 16
        assert PROVENANCE <= set(r["provenance"][0]) and PROVENANCE <= set(r["queue"])
        assert r["data"]["train_images"] == 320 and len(r["data"]["md5"]) == 4
        assert r["timing"]["epoch_s"] > 0 and "epochs=2" in r["command"]

    # Commit what came back; the next slot skips both items and plans the next one with the
    # first item's epoch count. Its committed timing is made huge, so it does not fit.
    for name in (cost_file, "vit-full-lr1e-3.jsonl"):
        shutil.copy(out / name, done)
    for r in runs:
        r["timing"] = {"startup_s": 1000.0, "epoch_s": 1.0}
    (done / "vit-full-lr1e-3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    env.pop("EPOCHS")
    out = tmp_path / "slot2"
    done_run = run_queue(out, {**env, "MAX_ITEMS": "1"}, timeout=60)
    printed = done_run.stdout + done_run.stderr
    assert done_run.returncode == 0, printed
    assert f"== gpu-cost: done ({done / cost_file})" in printed
    assert "== vit-full-lr1e-3: done" in printed and "== gpu-cost (" not in printed
    assert "== vit-full-lr1e-3-s1: not run in this slot: 2 epochs need about 10" in printed
    assert sorted(p.name for p in out.iterdir()) == ["queue-log.txt"]

    # No data: one line, exit status 2, and no ViT item starts.
    out = tmp_path / "slot3"
    done_run = run_queue(out, {**env, "DATA_DIR": str(tmp_path / "nowhere")}, timeout=60)
    printed = done_run.stdout + done_run.stderr
    assert done_run.returncode == 2, printed
    refusals = [line for line in printed.splitlines() if "no Fashion-MNIST" in line]
    assert len(refusals) == 1 and "carry .gpu-data" in refusals[0]
    assert "== vit-full-lr1e-3-s1 (" not in printed


@pytest.fixture()
def queue_env(tmp_path, monkeypatch):
    for name, folder in (("OUT", "out"), ("DONE_DIR", "done"), ("SCRATCH", "scratch")):
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("DEVICE", "cpu")
    for name in ("EPOCHS", "MAX_EPOCHS", "MIN_EPOCHS", "VIT_MIN_S", "EXTRA"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_first_item_fills_the_time_left_and_later_ones_repeat_it(queue_env, monkeypatch):
    monkeypatch.setenv("VIT_MIN_S", "0")
    monkeypatch.setattr(gpu_queue, "calibrate",
                        lambda *args: {"startup_s": 10.0, "epoch_s": 5.0, "arms": []})
    epochs, rule = gpu_queue.plan("vit-full-lr1e-3", 100, queue_env)
    assert epochs == 12  # (100 - 10 - 20 reserve) / (5 s * 1.1)
    assert rule["timing_from"] == "calibration in this slot"
    with pytest.raises(gpu_queue.NotNow, match="only 0 epochs fit"):
        gpu_queue.plan("vit-full-lr1e-3", 30, queue_env)
    monkeypatch.setenv("VIT_MIN_S", "400")
    with pytest.raises(gpu_queue.NotNow, match="VIT_MIN_S=400"):
        gpu_queue.plan("vit-full-lr1e-3", 300, queue_env)

    with pytest.raises(gpu_queue.NotNow, match="needs vit-full-lr1e-3's results first"):
        gpu_queue.plan("vit-full-lr3e-3", 500, queue_env)
    first = [{"arm": arm, "state": "finished", "epochs": 12,
              "timing": {"startup_s": 15.0, "epoch_s": 20.0 + i}}
             for i, arm in enumerate(gpu_queue.ARMS)]
    (queue_env / "done" / "vit-full-lr1e-3.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in first))
    epochs, rule = gpu_queue.plan("vit-full-lr3e-3", 500, queue_env)
    assert epochs == 12 and rule["need_s"] == round(15 + 12 * 23 * 1.1 + 20)  # slowest arm
    with pytest.raises(gpu_queue.NotNow, match="12 epochs need about 339 s, 300 s left"):
        gpu_queue.plan("vit-full-lr3e-3", 300, queue_env)
    # A later run of the first item times itself from these runs: no calibration.
    monkeypatch.setenv("VIT_MIN_S", "0")
    monkeypatch.setattr(gpu_queue, "calibrate", None)
    epochs, rule = gpu_queue.plan("vit-full-lr1e-3", 500, queue_env)
    assert rule["timing_from"] == "earlier queue runs" and epochs == int((500 - 35) / (23 * 1.1))


def test_a_run_still_going_at_the_deadline_is_cut(queue_env, monkeypatch):
    """Stand-in runs that finish one epoch, then would take a minute: stopped at the deadline,
    recorded as cut with that epoch, no final accuracy."""
    script = ("import json, sys, time, pathlib; run = pathlib.Path(sys.argv[1]); "
              "run.mkdir(parents=True); row = dict(kind='epoch', epoch=1, test_acc=0.5, "
              "test_loss=1.0, train_loss=1.0, train_acc=0.4, reg_loss=0.0, epoch_time=0.1); "
              "(run / 'metrics.jsonl').write_text(json.dumps(row) + '\\n'); time.sleep(60)")
    monkeypatch.setattr(gpu_queue, "train_command",
                        lambda arm, run, settings: [sys.executable, "-c", script, str(run)])
    # As under `make test &` or `nohup ... &`: a background job starts with SIGINT ignored, and
    # its children inherit that unless the queue gives them back the default.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start = time.monotonic()
        runs = gpu_queue.run_arms("cut", 1e-3, 0, 5, start + 3, queue_env)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 20
    for run in runs:
        record = gpu_queue.run_record("vit-full-lr1e-3", 1e-3, 0, 5, {}, run, {}, {})
        assert run["cut"] and len(run["ends"]) == 1
        assert (record["state"], record["epochs_done"], record["final_test_acc"],
                record["best_test_acc"]) == ("cut", 1, None, 0.5)
    assert not gpu_queue.is_done("vit-full-lr1e-3", [{"state": "cut"}] * 4)


def test_data_files_are_the_loaders():
    from sigreg.train.data import FASHION_MNIST_FILES

    assert gpu_queue.FASHION_MNIST_FILES == FASHION_MNIST_FILES
