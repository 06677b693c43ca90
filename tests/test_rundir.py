"""The run directory's lifecycle (sigreg.train.rundir): crash consistency, resume semantics,
and settings checked before any file is touched. CPU only, tiny runs.

Crashes are injected at named points of the epoch end in a forked child that dies with
``os._exit`` there (no ``finally``, no cleanup: what a ``kill -9`` leaves), not by timing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import select
import signal
import string
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sigreg.train import checkpoint, cli, rundir
from sigreg.train.config import RANGES, TrainConfig, apply_overrides
from sigreg.train.rundir import RunDirError
from sigreg.train.trainer import train

TIMING = {"epoch_time", "images_per_s", "train_time"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**changes) -> TrainConfig:
    """3 epochs of a 3-layer width-16 MLP with weak SIGReg on 32 synthetic images."""
    settings_ = {"dataset": "synthetic", "num_train": 32, "num_test": 40, "model": "mlp",
                 "model_args": {"depth": 3, "width": 16}, "epochs": 3, "batch_size": 8,
                 "optimizer": "adamw", "lr": 3e-3, "schedule": "cosine", "monitor_every": 3,
                 "device": "cpu", "sigreg": "weak", "sketch_dim": 8, "randaugment_ops": 1,
                 "mixup_alpha": 0.8}
    return TrainConfig(**{**settings_, **changes})


def quiet(_line: str) -> None:
    pass


def rows_without_timing(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def summary_without_timing(out: Path) -> dict:
    """The summary without times and provenance (a resumed run has a record per start)."""
    summary = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in (*TIMING, "provenance")}


def tensorboard_scalars(out: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar event on disk, as written, timing aside: raw
    events, not EventAccumulator's, which hides a step written twice."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = []
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag != "images_per_s":
                    found.append((value.tag, event.step, value.tensor.float_val[0]))
    return found


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and a hash of its bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("uninterrupted")
    train(tiny(), out, progress=False, log=quiet)
    return out


# --------------------------------------------------------------------------- crash points
def _die() -> None:
    os._exit(99)


def _crash_at(point: str, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Patch the child so it dies at ``point`` of the end of ``epoch``."""
    real_save, real_log_row, real_replace = (checkpoint.save_atomic, rundir.RunDir.log_row,
                                             os.replace)
    real_write_atomic, real_torch_save = rundir.write_atomic, torch.save

    def save_atomic(state, path):
        if state["epoch"] == epoch and point == "before-checkpoint":
            _die()
        real_save(state, path)
        if state["epoch"] == epoch and point == "after-checkpoint":
            _die()

    def torch_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == epoch and point == "during-checkpoint":
            f.write(b"half a checkpoint")
            f.flush()
            _die()
        real_torch_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if (point == "before-checkpoint-rename" and str(dst).endswith("checkpoint.pt")
                and torch.load(src, weights_only=True)["epoch"] == epoch):
            _die()
        real_replace(src, dst, *args, **kwargs)

    def log_row(self, row):
        if row.get("kind") == "epoch" and row["epoch"] == epoch:
            if point == "during-row":
                with self.metrics.open("a") as f:
                    f.write(json.dumps(row)[:20])
                _die()
            real_log_row(self, row)
            if point == "after-row":
                _die()
            return
        real_log_row(self, row)

    def write_atomic(path, text):
        if path.name == "summary.json" and point == "during-summary":
            Path(str(path) + ".partial.tmp").write_text(text[:10])
            _die()
        real_write_atomic(path, text)

    monkeypatch.setattr(checkpoint, "save_atomic", save_atomic)
    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(rundir.RunDir, "log_row", log_row)
    monkeypatch.setattr(rundir, "write_atomic", write_atomic)


def _train_and_die(out: Path, point: str, epoch: int) -> int:
    """Train in a forked child that dies at the crash point; returns its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            with pytest.MonkeyPatch.context() as mp:
                _crash_at(point, epoch, mp)
                train(tiny(), out, progress=False, log=quiet)
        except BaseException:  # noqa: BLE001 - any other way out is a failure of the test
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


EPOCH_END_POINTS = ["before-checkpoint", "during-checkpoint", "before-checkpoint-rename",
                    "after-checkpoint", "during-row", "after-row"]
CASES = [(p, e) for p in EPOCH_END_POINTS for e in (2, 3)] + [("during-summary", 3)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize(("point", "epoch"), CASES)
def test_resume_after_a_crash_at_every_point_equals_an_uninterrupted_run(
        point, epoch, uninterrupted, tmp_path):
    out = tmp_path / "run"
    assert _train_and_die(out, point, epoch) == 99, "the crash point was never reached"

    summary = train(tiny(), out, resume=True, progress=False, log=quiet)

    assert rows_without_timing(out) == rows_without_timing(uninterrupted)
    assert summary_without_timing(out) == summary_without_timing(uninterrupted)
    assert summary["final_test_acc"] == summary_without_timing(uninterrupted)["final_test_acc"]
    # Provenance: a record for the crashed start (it committed epoch 1) and one for the
    # resume; provenance.json and the summary agree.
    records = json.loads((out / "provenance.json").read_text())
    assert records == summary["provenance"] and len(records) == 2
    assert all(r["commit"] == records[-1]["commit"] and r["torch"] for r in records)
    want = checkpoint.load(uninterrupted / "checkpoint.pt")["model"]
    got = checkpoint.load(out / "checkpoint.pt")["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not list(out.glob("*.tmp"))
    # TensorBoard's view: every epoch and monitored step once, none lost to the crash.
    assert tensorboard_scalars(out) == tensorboard_scalars(uninterrupted)


def test_resume_of_a_finished_run_writes_nothing_new(uninterrupted, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl", "config.json", "summary.json"):
        (out / name).write_bytes((uninterrupted / name).read_bytes())
    lines: list[str] = []
    train(tiny(), out, resume=True, progress=False, log=lines.append)
    assert not any(line.startswith("epoch") for line in lines)  # nothing retrained
    assert rows_without_timing(out) == rows_without_timing(uninterrupted)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_honour_the_umask(umask, tmp_path):
    before = os.umask(umask)
    try:
        train(tiny(epochs=1), tmp_path / "run", progress=False, log=quiet)
    finally:
        os.umask(before)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"checkpoint.pt", "metrics.jsonl", "config.json",
                                       "summary.json", "provenance.json"}
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files} == \
        {str(p.relative_to(tmp_path)): oct(0o666 & ~umask) for p in files}


# --------------------------------------------------------------------------- resume semantics
@pytest.fixture()
def one_epoch(tmp_path) -> Path:
    out = tmp_path / "run"
    train(tiny(epochs=1), out, progress=False, log=quiet)
    return out


def test_resume_extends_a_run(one_epoch):
    lines: list[str] = []
    summary = train(tiny(epochs=2), one_epoch, resume=True, progress=False, log=lines.append)
    assert summary["epochs"] == 2
    # 4 steps an epoch: the 1-epoch cosine ended at step 3 of 4; the 2-epoch one is halfway
    # at step 4 of 8. The jump is said, with both learning rates.
    before = 3e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4))
    after = 3e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    assert (f"note: epochs 1 -> 2 changes the cosine schedule: the learning rate was "
            f"{before:.3g} at the end of epoch 1 and is {after:.3g} at the start of epoch 2: the "
            "schedule restarts from there over the new length, down to eta_min=0 at epoch 2") \
        in lines
    assert [r["epoch"] for r in rows_without_timing(one_epoch) if r["kind"] == "epoch"] == [1, 2]
    assert json.loads((one_epoch / "config.json").read_text())["epochs"] == 2


def test_resume_a_run_saved_before_sketch_policy_was_renamed(tmp_path):
    """A run whose checkpoint and config.json name the policy ``sketch``, as the version
    before the rename wrote them, resumes, and its policy is the one it was trained with."""
    out = tmp_path / "run"
    train(tiny(epochs=1, sketch_policy="fixed"), out, progress=False, log=quiet)
    state = checkpoint.load(out / "checkpoint.pt")
    state["config"]["sketch"] = state["config"].pop("sketch_policy")
    checkpoint.save_atomic(state, out / "checkpoint.pt")
    config = json.loads((out / "config.json").read_text())
    config["sketch"] = config.pop("sketch_policy")
    (out / "config.json").write_text(json.dumps(config))

    with pytest.raises(RunDirError, match=r"sketch_policy \('fixed' -> 'resample'\)"):
        train(tiny(epochs=2), out, resume=True, progress=False, log=quiet)
    summary = train(tiny(epochs=2, sketch_policy="fixed"), out, resume=True, progress=False,
                    log=quiet)
    assert summary["epochs"] == 2
    resumes = [r for r in rows_without_timing(out) if r["kind"] == "resume"]
    assert resumes == [{"kind": "resume", "epoch": 1, "changed": {"epochs": [1, 2]}}]
    assert json.loads((out / "config.json").read_text())["sketch_policy"] == "fixed"


def test_resume_refuses_changed_settings_and_records_allowed_ones(one_epoch):
    before = snapshot(one_epoch)
    changed = tiny(epochs=2, lr=1e-3, grad_clip=1.0)
    with pytest.raises(RunDirError) as info:
        train(changed, one_epoch, resume=True, progress=False, log=quiet)
    message = str(info.value)
    assert "lr (0.003 -> 0.001)" in message and "grad_clip (0.0 -> 1.0)" in message
    assert "--allow-change lr,grad_clip" in message and "epochs" not in message
    assert snapshot(one_epoch) == before

    lines: list[str] = []
    train(changed, one_epoch, resume=True, allow_changes=["lr", "grad_clip"], progress=False,
          log=lines.append)
    resumes = [r for r in rows_without_timing(one_epoch) if r["kind"] == "resume"]
    assert resumes == [{"kind": "resume", "epoch": 1, "changed": {
        "epochs": [1, 2], "lr": [0.003, 0.001], "grad_clip": [0.0, 1.0]}}]
    config = json.loads((one_epoch / "config.json").read_text())
    assert config["lr"] == 1e-3 and config["grad_clip"] == 1.0
    assert any("changed: epochs 1 -> 2, lr 0.003 -> 0.001" in line for line in lines)


def test_resume_refuses_another_preset(tmp_path):
    out = tmp_path / "run"
    train(tiny(epochs=1, preset="a"), out, progress=False, log=quiet)
    with pytest.raises(RunDirError, match="holds a run of preset 'a', not 'b'"):
        train(tiny(epochs=1, preset="b"), out, resume=True, allow_changes=["preset"],
              progress=False, log=quiet)


def test_resume_without_a_checkpoint_is_an_error_unless_auto(tmp_path):
    with pytest.raises(RunDirError, match="no checkpoint.pt"):
        train(tiny(epochs=1), tmp_path / "new", resume=True, progress=False, log=quiet)
    assert not (tmp_path / "new").exists()
    train(tiny(epochs=1), tmp_path / "new", resume="auto", progress=False, log=quiet)
    assert (tmp_path / "new" / "summary.json").exists()


def test_an_existing_run_is_replaced_only_when_asked(one_epoch):
    before = snapshot(one_epoch)
    with pytest.raises(RunDirError, match=r"already holds a run finished \(1 epoch\);"):
        train(tiny(epochs=1), one_epoch, progress=False, log=quiet)
    assert snapshot(one_epoch) == before
    train(tiny(epochs=1, seed=1), one_epoch, overwrite=True, progress=False, log=quiet)
    assert json.loads((one_epoch / "config.json").read_text())["seed"] == 1
    assert [r["epoch"] for r in rows_without_timing(one_epoch) if r["kind"] == "epoch"] == [1]


def test_damaged_checkpoints_are_one_line_errors(one_epoch, capsys):
    state = torch.load(one_epoch / "checkpoint.pt", weights_only=True)
    state["config"]["preset"] = "fmnist-mlp-weak"
    args = ["train", "--preset", "fmnist-mlp-weak", "--out", str(one_epoch), "--resume",
            "--no-progress", "--set", *settings_for(tiny(epochs=1))]
    for damage, expected in (("optimizer", "has no 'optimizer' entry"),
                             ("shape", "its 'model' does not fit this run")):
        broken = {**state, "model": dict(state["model"])}
        if damage == "optimizer":
            del broken["optimizer"]
        else:
            name = next(iter(broken["model"]))
            broken["model"][name] = torch.zeros(3, 3)
        torch.save(broken, one_epoch / "checkpoint.pt")
        before = snapshot(one_epoch)
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err
        assert snapshot(one_epoch) == before


def _no_epoch(state):
    del state["epoch"]


def _short_random_state(state):
    state["rng_ranks"]["cpu"][0] = torch.zeros(3, dtype=torch.uint8)


DOCTORED = {
    "no epoch": (_no_epoch, "its 'epoch' is None, not a finished epoch of the 1 epoch its"),
    "epoch two": (lambda s: s.update(epoch="two"), "its 'epoch' is 'two'"),
    "epoch -1": (lambda s: s.update(epoch=-1), "its 'epoch' is -1"),
    "epoch 5 of 1": (lambda s: s.update(epoch=5), "its 'epoch' is 5"),
    "rows 7": (lambda s: s.update(rows=7), "its 'rows' are not a list of metrics rows"),
    "rows of no epoch": (lambda s: s.update(rows=[r for r in s["rows"] if r["kind"] != "epoch"]),
                         "its 'rows' hold epochs [], not 1 to 1"),
    "3-byte random state": (_short_random_state, "a random state in it is not one"),
    "provenance 1": (lambda s: s.update(provenance=1), "its 'provenance' is not a list"),
    "config a list": (lambda s: s.update(config=[]), "its 'config' is not a trainer's settings"),
}


@pytest.mark.parametrize("resume", [True, False])
@pytest.mark.parametrize("doctored", list(DOCTORED))
def test_doctored_checkpoint_fields_are_one_line_errors_before_any_write(
        doctored, resume, one_epoch, capsys):
    state = torch.load(one_epoch / "checkpoint.pt", weights_only=True)
    state["config"]["preset"] = "fmnist-mlp-weak"
    change, expected = DOCTORED[doctored]
    change(state)
    torch.save(state, one_epoch / "checkpoint.pt")
    before = snapshot(one_epoch)
    args = ["train", "--preset", "fmnist-mlp-weak", "--out", str(one_epoch), "--no-progress",
            *(["--resume"] if resume else []), "--set", *settings_for(tiny(epochs=3))]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sigreg: error: {one_epoch / 'checkpoint.pt'}: ") and expected in err
    assert err.count("\n") == 1, err
    assert snapshot(one_epoch) == before


# --------------------------------------------------------------------------- bad input
def settings_for(cfg: TrainConfig) -> list[str]:
    """``--set`` items that turn the fmnist-mlp-weak preset into ``cfg``."""
    items = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in cfg.to_dict().items()
             if k not in ("model_args", "preset", "data_dir", "description")]
    return items + [f"model.{k}={v}" for k, v in cfg.model_args.items()]


NOT_A_NUMBER = ["nan", "NaN", "inf", "-inf", "abc", "true", "[1,2]", "none"]


def bad_values(key: str, low: float, high: float) -> st.SearchStrategy[str]:
    below = [repr(low - 1), repr(low - 0.5)] if low > -1e300 else []
    above = [repr(high + 1)] if high < float("inf") else []
    integral = [repr(low + 0.5)] if isinstance(low, int) else []
    values = [v for v in NOT_A_NUMBER if not (v == "none" and key in ("num_train", "num_test",
                                                                      "sketch_dim"))]
    return st.sampled_from(values + below + above + integral)


BAD_SETTING = st.one_of(
    *[bad_values(k, lo, hi).map(lambda v, k=k: f"{k}={v}") for k, (lo, hi, _) in RANGES.items()],
    st.sampled_from(["optimizer", "schedule", "sigreg", "sketch_policy", "device"]).flatmap(
        lambda k: st.text(string.ascii_lowercase, min_size=1, max_size=6).map(
            lambda v, k=k: f"{k}={v}x")),
    st.sampled_from(["model.depth=0", "model.depth=1.5", "model.width=-3", "model.color=1",
                     "betas=[0.9,1.5]", "eta_min=1", "learning_rate=0.1", "lr", "=3",
                     "data_dir=/nonexistent/fashion", "data_dir= ", "sketch_dim_per_layer=8,x",
                     "sketch_dim_per_layer=0", "sketch_dim_per_layer=8,8,8,8,8,8,8,8,8,8,8,8"]),
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", "--preset", "fmnist-mlp-weak", "--out", str(out), "--no-progress",
                     "--set", *settings_for(tiny(epochs=1))]) == 0
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=BAD_SETTING, resume=st.booleans(), fresh=st.booleans(),
       data=st.sampled_from([None, "fashion-mnist"]))
@example(bad="data_dir=/nonexistent/fashion", resume=False, fresh=True, data=None)
def test_bad_settings_exit_2_with_one_line_and_touch_nothing(
        bad, resume, fresh, data, finished_run, capsys):
    out = finished_run.parent / "fresh" if fresh else finished_run
    before = snapshot(finished_run.parent)
    if bad.startswith("data_dir=/"):
        # A missing data_dir is bad only for a dataset read from files: synthetic data ignores
        # it, and a fresh run trained (the example above; once drawn by chance here).
        data = "fashion-mnist"
    base = settings_for(tiny(epochs=1))
    if data:
        base = [s for s in base if not s.startswith("dataset=")] + [f"dataset={data}"]
    args = ["train", "--preset", "fmnist-mlp-weak", "--out", str(out), "--no-progress",
            *(["--resume"] if resume else []), "--set", *base, bad]
    assert cli.main(args) == 2, bad
    err = capsys.readouterr().err
    assert err.startswith("sigreg: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert snapshot(finished_run.parent) == before
    assert not (finished_run.parent / "fresh").exists()


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_bad_out_paths_exit_2(where, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = {"a file": blocker, "under a file": blocker / "run",
           "read-only": Path("/proc/sigreg-run")}[where]
    before = snapshot(tmp_path)
    assert cli.main(["train", "--preset", "fmnist-mlp-weak", "--out", str(out), "--no-progress",
                     "--set", *settings_for(tiny(epochs=1))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sigreg: error: --out") and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before


def test_a_full_disk_during_a_checkpoint_write_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    class FullDisk:
        """A file on a disk with 100 bytes left: a write that does not fit is cut there."""

        def __init__(self, f) -> None:
            self.f, self.room = f, 100

        def write(self, data) -> int:
            if len(data) > self.room:
                self.f.write(bytes(data)[:self.room])
                self.room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:  # the disk fills up in epoch 2
            f = FullDisk(f)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    args = ["train", "--preset", "fmnist-mlp-weak", "--out", str(out), "--no-progress",
            "--set", *settings_for(tiny())]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"sigreg: error: cannot write {out / 'checkpoint.pt'} (No space left on "
                   "device); the file there is unchanged: free some space, then rerun with "
                   "--resume\n")
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 1
    assert not list(out.glob("*.tmp")) and not (out / "run.lock").exists()
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main([*args, "--resume"]) == 0


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_an_interrupted_compare_or_sweep_advises_its_own_rerun(command, tmp_path, capsys,
                                                                monkeypatch):
    from sigreg.train import sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "train", interrupted)
    tiny_sets = ["dataset=synthetic", "num_train=32", "num_test=40", "epochs=1",
                 "model.depth=3", "model.width=16"]
    args = {"compare": ["compare", "--presets", "fmnist-mlp-weak"],
            "sweep": ["sweep", "--preset", "fmnist-mlp-weak", "--alpha", "0.1",
                      "--sketch-dim", "8", "--seeds", "1"]}[command]
    assert cli.main([*args, "--out", str(tmp_path), "--no-progress", "--set", *tiny_sets]) == 130
    err = capsys.readouterr().err
    assert err.startswith("sigreg: interrupted;") and "rerun the same command" in err
    assert "--resume" not in err  # an option they do not take


# --------------------------------------------------------------------------- one writer
def _train_and_hold(out: Path, cfg: TrainConfig, epoch: int) -> tuple[int, int]:
    """Fork a child that trains ``cfg`` into ``out`` and stops right after committing
    ``epoch``, still holding the run (as a run in progress does). Returns once it is there:
    its PID and the pipe that lets it go on (a byte; or EOF, or 120 s)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(ready_r)
            os.close(go_w)
            real_commit = rundir.RunDir.commit_epoch

            def commit_epoch(self, state, row):
                real_commit(self, state, row)
                if state["epoch"] == epoch:
                    os.write(ready_w, b"x")
                    select.select([go_r], [], [], 120)

            rundir.RunDir.commit_epoch = commit_epoch
            train(cfg, out, progress=False, log=quiet)
        except BaseException:  # noqa: BLE001 - any other way out is a failure of the test
            os._exit(3)
        os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    reached = os.read(ready_r, 1)  # blocks until the child is there (or dead: b"")
    os.close(ready_r)
    assert reached == b"x", "the child died before it committed the epoch"
    return pid, go_w


def _let_go(pid: int, go: int) -> int:
    os.write(go, b"g")
    os.close(go)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(
        tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny(preset="fmnist-mlp-weak")
    pid, go = _train_and_hold(out, cfg, epoch=1)  # epoch 1 of 3 committed, still training
    try:
        before = snapshot(tmp_path)
        args = ["train", "--preset", "fmnist-mlp-weak", "--out", str(out), "--no-progress",
                "--set", *settings_for(cfg)]
        for extra in ([], ["--resume"], ["--overwrite"], ["--resume", "auto"]):
            assert cli.main([*args, *extra]) == 2, extra
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"is being written by PID {pid}" in err, err
            assert snapshot(tmp_path) == before, extra
        assert (out / "run.lock").read_text() == f"{pid}\n"
    finally:
        os.kill(pid, signal.SIGKILL)  # the holder dies without any cleanup: a stale lock
        os.close(go)
        os.waitpid(pid, 0)
    assert (out / "run.lock").read_text() == f"{pid}\n"
    # The lock died with its holder: the next writer takes it over and resumes the run.
    assert cli.main([*args, "--resume"]) == 0
    assert [r["epoch"] for r in rows_without_timing(out) if r["kind"] == "epoch"] == [1, 2, 3]
    assert not (out / "run.lock").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_sweep_waits_for_a_run_another_process_writes_and_never_writes_it_twice(tmp_path):
    from sigreg.train import sweep

    out, tiny_sets = tmp_path / "sweep", [
        "dataset=synthetic", "num_train=32", "num_test=40", "epochs=2", "batch_size=8",
        "model.depth=3", "model.width=16", "monitor_every=0", "device=cpu"]
    cfg = apply_overrides(sweep.base_config("fmnist-mlp-weak", tiny_sets),
                          ["alpha=0.1", "sketch_dim=8", "seed=0"])
    # Another process (an orphaned worker, a concurrent sweep) has committed the last epoch
    # of the run and is about to write its summary.
    pid, go = _train_and_hold(out / "a0.1-k8-s0", cfg, epoch=2)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "waiting" in line:  # the sweep waits for it: let it finish now
            lines.append(f"exit {_let_go(pid, go)}")

    try:
        result = sweep.run_sweep("fmnist-mlp-weak", [0.1], [8], 1, out, tiny_sets, log=log)
    finally:
        if "exit 0" not in lines:
            _let_go(pid, go)
    assert f"  a0.1-k8-s0: PID {pid} is writing it; waiting for it to finish" in lines
    assert lines[lines.index("exit 0") + 1] == "  a0.1-k8-s0: done already, skipped"
    run = out / "a0.1-k8-s0"
    # Written once, by the other process: a resume would have added a start record.
    assert len(json.loads((run / "summary.json").read_text())["provenance"]) == 1
    assert [r["epoch"] for r in rows_without_timing(run) if r["kind"] == "epoch"] == [1, 2]
    assert result["runs"][0]["final_test_acc"] == rows_without_timing(run)[-1]["test_acc"]


def test_cli_resume_flag_values(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--preset", "fmnist-mlp-weak", "--resume", "maybe"])
    assert info.value.code == 2
    assert "expected nothing or 'auto'" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
