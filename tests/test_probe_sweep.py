"""End-to-end tests of ``sigreg probe`` and ``sigreg sweep`` on tiny synthetic runs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _fake_datasets import write_fashion_mnist

from sigreg.train.cli import main
from sigreg.train.sweep import markdown, parse_list

TINY = ["dataset=synthetic", "num_train=64", "num_test=64", "epochs=1", "batch_size=32",
        "model.depth=3", "model.width=16", "monitor_every=0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny-weak"
    assert main(["train", "--preset", "fmnist-mlp-weak", "--out", str(run), "--no-progress",
                 "--set", *TINY]) == 0
    return run


def _check_probe(path: Path, runs: set[str]) -> None:
    results = json.loads((path / "probe.json").read_text())
    assert set(results) == runs
    for layers in results.values():
        assert list(layers) == ["layers.0", "layers.1"]  # depth 3: two hidden layers
        for m in layers.values():
            assert all(math.isfinite(v) for v in m.values())
            assert m["width"] == 16 and m["num_samples"] == 64
            assert 1.0 <= m["effective_dim"] <= m["width"]
            assert 0.0 <= m["entropy_ratio"] <= 1.0 + 1e-9
    assert (path / "probe.png").stat().st_size > 0


def test_probe_run_dir_and_parent_dir(trained_run: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--run", str(trained_run)]) == 0
    _check_probe(trained_run, {"tiny-weak"})
    assert "| tiny-weak | layers.0 |" in capsys.readouterr().out
    # A compare-style directory: the runs are its subdirectories.
    out = tmp_path / "probe"
    assert main(["probe", "--run", str(trained_run.parent), "--out", str(out),
                 "--max-samples", "40"]) == 0
    results = json.loads((out / "probe.json").read_text())
    assert results["tiny-weak"]["layers.0"]["num_samples"] == 40


def test_probe_errors(trained_run: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sigreg: error:") and "no checkpoint.pt" in err
    assert main(["probe", "--run", str(tmp_path / "missing")]) == 2
    assert "neither a run directory nor a checkpoint file" in capsys.readouterr().err
    # Files that are not checkpoints of the trainer: one line each, no traceback.
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    assert main(["probe", "--run", str(tmp_path / "notes.pt")]) == 2
    assert "notes.pt is not a readable sigreg checkpoint" in capsys.readouterr().err
    assert main(["probe", "--run", str(tmp_path / "state_dict.pt")]) == 2
    assert "state_dict.pt is not a sigreg checkpoint (no config and model" in \
        capsys.readouterr().err
    # A model trained on 3x32x32 synthetic images cannot read 28x28 Fashion-MNIST.
    data = tmp_path / "data"
    write_fashion_mnist(data / "fashion-mnist", n_train=20, n_test=12)
    assert main(["probe", "--run", str(trained_run), "--dataset", "fashion-mnist",
                 "--data-dir", str(data), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "trained on synthetic; it does not fit fashion-mnist (1x28x28 images" in err


@pytest.mark.parametrize(("device", "message"), [
    ("foo", "--device foo: not a device; use cpu, cuda, cuda:N or mps"),
    ("meta", "--device meta: probing runs on cpu, cuda, cuda:N or mps"),
    pytest.param("cuda", "--device cuda: no CUDA device is available here; use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_probe_on_a_device_it_cannot_use_says_so(device: str, message: str, trained_run: Path,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "probe"
    assert main(["probe", "--run", str(trained_run), "--device", device, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"sigreg: error: {message}\n"
    assert not out.exists()


def test_probe_a_moved_checkpoint_on_its_moved_dataset(tmp_path: Path) -> None:
    # Trained on Fashion-MNIST in one place; the checkpoint and the data then live elsewhere.
    first, moved = tmp_path / "first", tmp_path / "moved"
    write_fashion_mnist(first / "fashion-mnist", n_train=32, n_test=16)
    run = tmp_path / "run"
    assert main(["train", "--preset", "fmnist-mlp-weak", "--out", str(run), "--no-progress",
                 "--set", f"data_dir={first}", "num_train=none", "num_test=none", "epochs=1",
                 "batch_size=16", "model.depth=3", "model.width=16", "monitor_every=0"]) == 0
    shutil.rmtree(first)
    write_fashion_mnist(moved / "fashion-mnist", n_train=32, n_test=24, seed=1)
    checkpoint = tmp_path / "kept" / "weak-mlp.pt"
    checkpoint.parent.mkdir()
    shutil.copy(run / "checkpoint.pt", checkpoint)
    out = tmp_path / "probe"
    assert main(["probe", "--run", str(checkpoint), "--data-dir", str(moved),
                 "--out", str(out)]) == 0
    results = json.loads((out / "probe.json").read_text())
    assert list(results) == ["weak-mlp"]
    # The 24 test images of the moved copy, not the 16 of the original (or a system copy).
    assert {m["num_samples"] for m in results["weak-mlp"].values()} == {24}


def test_sweep_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "--preset", "fmnist-mlp-weak", "--alpha", "0.1,0.3", "--sketch-dim", "8",
            "--seeds", "1", "--out", str(out), "--no-progress", "--set", *TINY]
    assert main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [(c["alpha"], c["sketch_dim"], c["num_seeds"]) for c in result["cells"]] == [
        (0.1, 8, 1), (0.3, 8, 1)]
    for cell in result["cells"]:
        assert 0.0 <= cell["mean_test_acc"] <= 1.0 and cell["std_test_acc"] == 0.0
    for name in ("a0.1-k8-s0", "a0.3-k8-s0"):
        config = json.loads((out / name / "config.json").read_text())
        assert (config["alpha"], config["sketch_dim"], config["seed"]) == (
            float(name[1:4]), 8, 0)
    md = (out / "sweep.md").read_text()
    assert "| alpha \\ K | 8 |" in md and "| 0.1 | " in md and "| 0.3 | " in md
    assert "±" not in md and "seed [0];" in md  # one seed: no spread to show
    assert (out / "sweep.png").stat().st_size > 0

    # A rerun trains nothing: the finished runs are left untouched.
    summaries = sorted(out.glob("*/summary.json"))
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    capsys.readouterr()
    assert main(argv) == 0
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes
    assert capsys.readouterr().out.count("done already, skipped") == 2

    # A run saved before a setting existed still counts (the setting takes its default);
    # a run with another value of a setting does not.
    summary_path = out / "a0.1-k8-s0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    del summary["config"]["vicreg_cov_weight"]
    summary_path.write_text(json.dumps(summary))
    assert main(argv) == 0
    summary["config"]["lr"] = 0.5
    summary_path.write_text(json.dumps(summary))
    assert main(argv) == 2
    assert "different config" in capsys.readouterr().err

    # An interrupted run (no summary) with other settings: the sweep's own advice, not
    # `sigreg train`'s --allow-change.
    summary_path.unlink()
    assert main([*argv, "--set", "lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "interrupted run with other settings" in err and "--allow-change" not in err


def test_sweep_table_shows_a_spread_only_over_several_seeds() -> None:
    def result(accs: list[float], epochs: int) -> dict:
        cell = {"alpha": 0.1, "sketch_dim": 8, "mean_test_acc": sum(accs) / len(accs),
                "std_test_acc": 0.01 if len(accs) > 1 else 0.0, "num_seeds": len(accs),
                "test_accs": accs}
        return {"preset": "fmnist-mlp-weak", "sigreg": "weak", "overrides": [f"epochs={epochs}"],
                "epochs": epochs, "alphas": [0.1], "sketch_dims": [8],
                "seeds": list(range(len(accs))), "cells": [cell]}

    one = markdown(result([0.5], 1))
    assert "seed [0]; 1 epoch, settings epochs=1." in one
    assert "| 0.1 | 50.00 |" in one and "±" not in one
    two = markdown(result([0.5, 0.52], 3))
    assert "mean ± sample std over seeds [0, 1]; 3 epochs, settings epochs=3." in two
    assert "| 0.1 | 51.00 ± 1.00 |" in two


def test_parallel_sweep_equals_sequential(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    grid = ["sweep", "--preset", "fmnist-mlp-weak", "--alpha", "0.1,0.3", "--sketch-dim", "4,8",
            "--seeds", "1", "--no-progress", "--set", *TINY]
    assert main([*grid, "--out", str(tmp_path / "seq")]) == 0
    assert main([*grid, "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 runs to train, 2 at a time" in out and out.count("final test acc") == 4
    seq = json.loads((tmp_path / "seq" / "sweep.json").read_text())
    par = json.loads((tmp_path / "par" / "sweep.json").read_text())
    assert [r["name"] for r in par["runs"]] == [r["name"] for r in seq["runs"]]
    for a, b in zip(par["runs"], seq["runs"], strict=True):
        assert a["final_test_acc"] == pytest.approx(b["final_test_acc"], abs=1e-9), a["name"]
    assert "epoch   1/1" in (tmp_path / "par" / "a0.1-k4-s0" / "train.log").read_text()
    # Rerun in parallel: every run is found finished in this process, nothing is spawned.
    assert main([*grid, "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("done already, skipped") == 4 and "runs to train" not in out
    assert main([*grid, "--out", str(tmp_path / "bad"), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


SWEEP_PARENT = """
import os, sys, time
from pathlib import Path
from sigreg.train import cli, rundir, sweep

REAL_WORKER = sweep._train_in_worker


def worker_stopped_after_epoch_1(config, run_dir, threads):
    # The sweep's own worker, held right after its run committed epoch 1 (still training,
    # as far as anyone can tell); it says so with a file naming its PID.
    commit = rundir.RunDir.commit_epoch

    def commit_and_stop(self, state, row):
        commit(self, state, row)
        Path(run_dir, "worker.pid").write_text(str(os.getpid()))
        time.sleep(600)

    rundir.RunDir.commit_epoch = commit_and_stop
    return REAL_WORKER(config, run_dir, threads)


if __name__ == "__main__":
    sweep._train_in_worker = worker_stopped_after_epoch_1
    sys.exit(cli.main(sys.argv[1:]))
"""


def _children(parent: int) -> set[int]:
    """PIDs of the processes whose parent is ``parent`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sweep_workers_end_when_the_parent_is_killed(tmp_path: Path) -> None:
    script, out = tmp_path / "parent.py", tmp_path / "sweep"
    script.write_text(SWEEP_PARENT)
    argv = ["sweep", "--preset", "fmnist-mlp-weak", "--alpha", "0.1,0.3", "--sketch-dim", "8",
            "--seeds", "1", "--out", str(out), "--no-progress", "--set", *TINY, "epochs=2"]
    parallel = [*argv, "--jobs", "2"]
    runs = [out / "a0.1-k8-s0", out / "a0.3-k8-s0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "parent.log").open("w") as log:
        parent = subprocess.Popen([sys.executable, str(script), *parallel], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        # Both workers have committed epoch 1 of 2 and hold their runs.
        assert _wait_for(lambda: all((r / "worker.pid").exists() for r in runs)
                         or parent.poll() is not None, 300), "the workers never got there"
        assert parent.poll() is None, (tmp_path / "parent.log").read_text()[-3000:]
        workers = {int((r / "worker.pid").read_text()) for r in runs}
        children = _children(parent.pid)
        assert workers < children  # and multiprocessing's resource tracker
        parent.kill()
        parent.wait()
        assert _wait_for(lambda: not any(map(_alive, children)), 5), \
            f"still running 5 s after the sweep was killed: {[p for p in children if _alive(p)]}"
    finally:
        parent.kill()
        parent.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # A rerun continues the runs from their checkpoints, with nobody else writing them.
    assert main([*argv, "--jobs", "1"]) == 0
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]


@pytest.mark.parametrize(("args", "message"), [
    (["--preset", "fmnist-mlp-none", "--alpha", "0.1", "--sketch-dim", "8"],
     "choose a -weak or -strong preset"),
    (["--preset", "fmnist-mlp-vicreg", "--alpha", "0.1", "--sketch-dim", "8"],
     "no sketch to size"),
    (["--preset", "fmnist-mlp-weak", "--alpha", "0.1,abc", "--sketch-dim", "8"],
     "--alpha: 'abc' is not a number"),
    (["--preset", "fmnist-mlp-weak", "--alpha", "0.1", "--sketch-dim", "8,1.5"],
     "--sketch-dim: '1.5' is not an integer"),
    (["--preset", "fmnist-mlp-weak", "--alpha", "1.5", "--sketch-dim", "8"],
     "strictly between 0 and 1"),
    (["--preset", "fmnist-mlp-weak", "--alpha", "0.1", "--sketch-dim", "8", "--set", "seed=3"],
     "conflicts with the sweep"),
    (["--preset", "fmnist-mlp-weak", "--alpha", "0.1", "--sketch-dim", "8", "--set",
      "sketch_dim_per_layer=8,8"], "would override every swept K"),
])
def test_sweep_errors(args: list[str], message: str, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", *args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sigreg: error:") and message in err
    assert not (tmp_path / "s").exists()  # failed before any training


def test_parse_list() -> None:
    assert parse_list("0.01, 0.1", float, "--alpha") == [0.01, 0.1]
    assert parse_list("16,64", int, "--sketch-dim") == [16, 64]
    for bad in ("", "0.1,", "0.1,0.1", "nan"):
        with pytest.raises(ValueError, match="--alpha"):
            parse_list(bad, float, "--alpha")
