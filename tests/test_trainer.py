"""End-to-end checks of the training loop (sigreg.train.trainer) on the synthetic dataset, CPU only.

Every run is tiny (a few steps of a model with a handful of units), so the whole file stays
well under a minute on two cores.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sigreg.train import checkpoint
from sigreg.train.config import TrainConfig, apply_overrides
from sigreg.train.models import build_model
from sigreg.train.presets import PRESETS, preset_config
from sigreg.train.trainer import TrainingDiverged, train

# Tiny sizes per model family, as ``--set`` overrides.
TINY = {
    "paper-vit": ["model.patch_size=8", "model.dim=16", "model.depth=2", "model.heads=2",
                  "model.mlp_ratio=1"],
    "peak-vit": ["model.patch_size=8", "model.dim=16", "model.depth=2", "model.heads=2",
                 "model.mlp_ratio=1"],
    "mlp": ["model.depth=3", "model.width=16"],
    "resnet18": ["model.width=4", "model.blocks=[1,1]"],
}
TIMING_KEYS = {"epoch_time", "images_per_s"}


pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(_line: str) -> None:
    pass


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def epoch_rows(out: Path) -> list[dict]:
    return [r for r in read_rows(out) if r["kind"] == "epoch"]


def flat(row: dict, prefix: str = "") -> dict:
    """A metrics row as one flat dict ("eff_dim.blocks.0": ...), wall-clock fields left out."""
    out = {}
    for key, value in row.items():
        if key in TIMING_KEYS:
            continue
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def tiny_mlp(**changes) -> TrainConfig:
    """A 3-layer width-16 MLP on 32 synthetic images, 8 per batch: 4 steps an epoch."""
    settings = {"dataset": "synthetic", "num_train": 32, "num_test": 40, "model": "mlp",
                "model_args": {"depth": 3, "width": 16}, "epochs": 1, "batch_size": 8,
                "optimizer": "sgd", "lr": 0.05, "schedule": "constant", "monitor_every": 1,
                "device": "cpu", "sketch_dim": 8}
    return TrainConfig(**{**settings, **changes})


# --------------------------------------------------------------------------- 1. every preset
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_trains_two_steps(name, tmp_path):
    preset = preset_config(name)
    cfg = apply_overrides(preset, [
        "dataset=synthetic", "epochs=1", "num_train=16", "batch_size=8", "num_test=20",
        "monitor_every=1", "device=cpu", *TINY[preset.model],
    ])
    # Only sizes, data and schedule length change; the preset's recipe is what runs.
    for key in ("model", "optimizer", "sigreg", "sketch_dim", "sketch_policy", "mixup_alpha",
                "cutmix_alpha", "randaugment_ops", "grad_clip", "alpha"):
        assert getattr(cfg, key) == getattr(preset, key)

    summary = train(cfg, tmp_path, progress=False, log=quiet)

    rows = read_rows(tmp_path)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    monitors = [r for r in rows if r["kind"] == "monitor"]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 1
    row = epochs[0]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])
    assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["train_acc"] <= 1.0
    # 16 images / 8 per batch = exactly 2 optimizer steps, each measured by the monitor.
    assert [m["step"] for m in monitors] == [0, 1]

    model = build_model(cfg.model, num_classes=10, image_size=32, in_channels=3, **cfg.model_args)
    layers = set(model.sigreg_layers)
    assert all(set(m["eff_dim"]) == layers for m in monitors)
    if cfg.sigreg == "none":
        assert row["reg_layers"] == {} and row["reg_loss"] == 0.0
    else:
        assert set(row["reg_layers"]) == layers
        assert all(math.isfinite(v) for v in row["reg_layers"].values())
        assert row["reg_loss"] != 0.0

    # The checkpoint holds a model of exactly this shape, and the run's files are consistent.
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    model.load_state_dict(state["model"])  # strict: same names and shapes
    assert state["epoch"] == 1
    assert TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    assert json.loads((tmp_path / "summary.json").read_text())["final_test_acc"] == row["test_acc"]
    assert summary["final_test_acc"] == row["test_acc"]


# --------------------------------------------------------------------------- 2. resume
MIX_WEAK = {"epochs": 3, "sigreg": "weak", "sketch_policy": "resample", "randaugment_ops": 2,
            "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "optimizer": "adamw", "lr": 3e-3}
RESUME_CONFIGS = {
    # weak SIGReg with a fresh sketch every step, RandAugment, crop/flip and MixUp/CutMix.
    "mlp-weak-mix": tiny_mlp(**MIX_WEAK),
    # Drop path draws from torch's global RNG, which the checkpoint must restore.
    "peak-vit": tiny_mlp(epochs=3, model="peak-vit", sigreg="weak", optimizer="adamw", lr=1e-3,
                         model_args={"patch_size": 8, "dim": 16, "depth": 2, "heads": 2,
                                     "mlp_ratio": 1, "drop_path_rate": 0.5},
                         randaugment_ops=1, mixup_alpha=0.8, grad_clip=1.0),
    # A learning rate that changes every step (every preset but the MLP ones uses cosine).
    "mlp-cosine": tiny_mlp(**MIX_WEAK, schedule="cosine", warmup_epochs=0.5),
    # alpha=auto: the weight of every step (alpha_steps in the rows) depends on the averages
    # of the gradients measured so far, which the checkpoint must carry.
    "mlp-auto": tiny_mlp(**MIX_WEAK, alpha="auto"),
}
RESUME_CASES = list(RESUME_CONFIGS)


def interrupt_after_epoch_1(line: str) -> None:
    """A log callback that stops the run right after epoch 1's checkpoint and row."""
    if re.match(r"epoch\s+1/3\b", line):
        raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["interrupt", "crash-mid-epoch"])
@pytest.mark.parametrize("name", RESUME_CASES)
def test_resume_matches_uninterrupted_run(name, how, tmp_path, monkeypatch):
    cfg = RESUME_CONFIGS[name]
    summary_a = train(cfg, tmp_path / "a", progress=False, log=quiet)
    rows_a = read_rows(tmp_path / "a")

    out = tmp_path / "b"
    if how == "interrupt":
        # Ctrl-C right after epoch 1 was logged: checkpoint and rows are at epoch 1.
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out, progress=False, log=interrupt_after_epoch_1)
    else:
        # Dies while saving epoch 2: epoch 2's monitor rows are in the log, the checkpoint
        # still says epoch 1. The resume must drop those rows, not duplicate them.
        real_save = checkpoint.save_atomic

        def dying_save(state, path):
            if state["epoch"] == 2:
                raise RuntimeError("simulated crash")
            real_save(state, path)

        monkeypatch.setattr(checkpoint, "save_atomic", dying_save)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg, out, progress=False, log=quiet)
        monkeypatch.setattr(checkpoint, "save_atomic", real_save)
        assert any(r["epoch"] == 2 for r in read_rows(out))
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in epoch_rows(out)] == [1]

    lines: list[str] = []
    summary_b = train(cfg, out, resume=True, progress=False, log=lines.append)
    assert any(line.startswith("resumed") and "epoch 1/3" in line for line in lines)
    assert sum(bool(re.match(r"epoch\s+\d+/3", line)) for line in lines) == 2  # epochs 2 and 3

    rows_b = read_rows(out)
    assert [r["epoch"] for r in epoch_rows(out)] == [1, 2, 3]
    assert [(r["kind"], r["epoch"], r.get("step")) for r in rows_b] == \
        [(r["kind"], r["epoch"], r.get("step")) for r in rows_a]
    # Same numbers as the run that was never stopped: losses, accuracies, lr, eff. dims.
    for got, want in zip(rows_b, rows_a, strict=True):
        got, want = flat(got), flat(want)
        numbers = {k for k, v in want.items() if isinstance(v, float)}
        assert {k: v for k, v in got.items() if k not in numbers} == \
            {k: v for k, v in want.items() if k not in numbers}
        assert {k: got.get(k) for k in numbers} == \
            pytest.approx({k: want[k] for k in numbers}, rel=1e-6, abs=1e-9)
    for key in ("final_test_acc", "best_test_acc", "best_epoch"):
        assert summary_b[key] == summary_a[key]
    # The trajectory is not trivially constant: epochs differ from each other.
    losses = [r["train_loss"] for r in epoch_rows(out)]
    assert len(set(losses)) == 3



def test_compile_true_trains_like_eager(tmp_path):
    cfg = tiny_mlp(sigreg="weak", epochs=2)
    eager = epoch_rows(_run(cfg, tmp_path / "eager"))
    compiled = epoch_rows(_run(tiny_mlp(sigreg="weak", epochs=2, compile=True), tmp_path / "c"))
    for got, want in zip(compiled, eager, strict=True):
        for key in ("train_loss", "reg_loss", "test_loss", "test_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
        assert got["reg_layers"] == pytest.approx(want["reg_layers"], rel=1e-5)


# --------------------------------------------------------------------------- 3. divergence
def test_divergence_in_epoch_2_keeps_epoch_1_checkpoint(tmp_path):
    # One step per epoch; lr 1e30 with no clipping: the first step's loss is finite (initial
    # weights), the update makes the weights ~1e30 and the next forward overflows.
    cfg = tiny_mlp(epochs=3, num_train=16, batch_size=16, lr=1e30, grad_clip=0.0, sigreg="weak")
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, tmp_path, progress=False, log=quiet)
    message = str(info.value)
    assert "epoch 2" in message
    assert f"{tmp_path / 'checkpoint.pt'} (epoch 1)" in message

    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r["epoch"] for r in epoch_rows(tmp_path)] == [1]
    assert math.isfinite(epoch_rows(tmp_path)[0]["train_loss"])


def test_divergence_in_epoch_1_has_no_checkpoint(tmp_path):
    cfg = tiny_mlp(epochs=3, num_train=32, batch_size=16, lr=1e30, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match=r"epoch 1 by step 2; last good checkpoint: none yet"):
        train(cfg, tmp_path, progress=False, log=quiet)
    assert not (tmp_path / "checkpoint.pt").exists()
    assert epoch_rows(tmp_path) == []
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- 4. DDP
DDP_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from sigreg.train.config import TrainConfig
from sigreg.train.trainer import train

torch.set_num_threads(1)
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
train(cfg, sys.argv[2], progress=False, log=lambda _: None)
"""


def run_two_ranks(script: Path, cfg: TrainConfig, out: Path, *args: str,
                  timeout: float = 120) -> subprocess.CompletedProcess:
    """``script cfg out *args`` on 2 CPU ranks under torchrun; --standalone picks a free
    port itself (choosing one here and passing it on races with other processes)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), json.dumps(cfg.to_dict()), str(out), *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


DDP_DIVERGE_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
import sigreg.train.trainer as trainer
from sigreg.train.config import TrainConfig

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
build = trainer.build_model

def build_poisoned(*args, **kwargs):
    # Rank 1 alone produces NaN logits on its 2nd training forward: the last step of
    # epoch 1, where the non-finite check runs; rank 0's loss is still finite there.
    model = build(*args, **kwargs)
    calls = [0]
    def poison(module, inputs, output):
        if module.training:
            calls[0] += 1
            if rank == 1 and calls[0] == 2:
                return output * float("nan")
    model.register_forward_hook(poison)
    return model

trainer.build_model = build_poisoned
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
try:
    trainer.train(cfg, sys.argv[2], progress=False, log=lambda _: None)
except trainer.TrainingDiverged as exc:
    Path(sys.argv[2], f"diverged-rank{rank}").write_text(str(exc))
"""


def test_divergence_on_one_rank_stops_every_rank(tmp_path):
    cfg = tiny_mlp(num_train=32, batch_size=16, crop_padding=0, flip=False, epochs=2)
    script = tmp_path / "diverge.py"
    script.write_text(textwrap.dedent(DDP_DIVERGE_SCRIPT))
    out = tmp_path / "ddp"
    proc = run_two_ranks(script, cfg, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        message = (out / f"diverged-rank{rank}").read_text()
        assert "epoch 1 by step 2" in message
    assert not (out / "checkpoint.pt").exists()


def test_cli_under_torchrun_exits_0_on_every_rank_and_prints_once(tmp_path):
    # The README's multi-process command, shrunk: every rank must exit 0 (a scheduler marks a
    # job failed otherwise) and only rank 0 prints the summary line.
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "sigreg.train.cli", "train", "--preset", "fmnist-mlp-weak", "--out", str(out),
         "--no-progress", "--set", "dataset=synthetic", "num_train=64", "num_test=40",
         "epochs=1", "batch_size=16", "model.depth=3", "model.width=16", "device=cpu"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if "final test acc" in line]
    assert len(summaries) == 1 and summaries[0].startswith("fmnist-mlp-weak: final test acc")
    assert "terminate called" not in proc.stderr


def test_two_cpu_ranks_match_one_process(tmp_path):
    # No random augmentation, so 2 ranks x 8 images must follow the same trajectory as one
    # process with 16: gradients are averaged by DDP, weak SIGReg pools global-batch statistics,
    # the evaluation shards are all-reduced.
    cfg = tiny_mlp(num_train=32, batch_size=16, sigreg="weak", crop_padding=0, flip=False,
                   epochs=2)
    script = tmp_path / "run_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out = tmp_path / "ddp"
    proc = run_two_ranks(script, cfg, out)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = epoch_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]  # written once, by rank 0
    assert json.loads((out / "summary.json").read_text())["final_test_acc"] == rows[-1]["test_acc"]
    for row in rows:
        assert math.isfinite(row["train_loss"])
        # Throughput counts both ranks: 2 steps x 16 images (8 per rank) per epoch.
        assert row["images_per_s"] * row["epoch_time"] == pytest.approx(32, rel=1e-6)

    single = epoch_rows(_run(cfg, tmp_path / "single"))
    for got, want in zip(rows, single, strict=True):
        for key in ("train_loss", "task_loss", "reg_loss", "train_acc", "test_loss", "test_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        assert got["reg_layers"] == pytest.approx(want["reg_layers"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["weak", "strong"])
def test_two_cpu_ranks_compiled_match_one_process(variant, tmp_path):
    # compile=true under torchrun: model and batched regularizer compiled on each rank, the
    # global-batch all-reduces run eagerly between the compiled pieces (slow: inductor
    # compiles on each rank).
    settings = dict(num_train=32, batch_size=16, sigreg=variant, crop_padding=0, flip=False,
                    epochs=2)
    cfg = tiny_mlp(**settings, compile=True)
    script = tmp_path / "run_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    proc = run_two_ranks(script, cfg, tmp_path / "ddp", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = epoch_rows(tmp_path / "ddp")
    single = epoch_rows(_run(tiny_mlp(**settings), tmp_path / "single"))  # eager
    for got, want in zip(rows, single, strict=True):
        for key in ("train_loss", "task_loss", "reg_loss", "train_acc", "test_loss", "test_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


DDP_RESUME_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from sigreg.train.config import TrainConfig
from sigreg.train.trainer import train

torch.set_num_threads(1)
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
mode = sys.argv[3]

def log(line):
    if mode == "stop" and line.split()[:2] == ["epoch", "1/3"]:
        # Rank 0 (the one that logs) dies right after epoch 1's checkpoint; rank 1 then
        # fails in its next collective, as a job does when one of its processes is killed.
        raise KeyboardInterrupt

try:
    train(cfg, sys.argv[2], resume=mode == "resume", progress=False, log=log)
except KeyboardInterrupt:
    pass
"""


@pytest.mark.parametrize("alpha", [0.1, "auto"])
def test_two_cpu_ranks_resume_exactly(alpha, tmp_path):
    # Random crops, flips, RandAugment and MixUp/CutMix drawn independently on each rank:
    # the checkpoint must carry both ranks' streams for epochs 2-3 to repeat exactly (and,
    # with alpha=auto, the weight's state, settled on every rank before the save).
    cfg = tiny_mlp(num_train=32, batch_size=16, sigreg="weak", epochs=3, randaugment_ops=1,
                   mixup_alpha=0.8, cutmix_alpha=1.0, alpha=alpha)
    script = tmp_path / "resume_ddp.py"
    script.write_text(textwrap.dedent(DDP_RESUME_SCRIPT))
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    for out, mode in ((full, "full"), (stopped, "stop"), (stopped, "resume")):
        proc = run_two_ranks(script, cfg, out, mode)
        if mode == "stop":
            assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 1
            assert [r["epoch"] for r in epoch_rows(out)] == [1]
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = epoch_rows(full), epoch_rows(stopped)
    assert [r["epoch"] for r in got] == [1, 2, 3]
    for g, w in zip(got[1:], want[1:], strict=True):
        for key in ("train_loss", "task_loss", "reg_loss", "train_acc", "test_loss", "test_acc"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), key
        if alpha == "auto":
            assert g["alpha_steps"] == pytest.approx(w["alpha_steps"], rel=1e-6)


def test_two_cpu_ranks_auto_weight_matches_one_process(tmp_path):
    # alpha=auto on 2 ranks x 8 images: the squared gradient norms are summed over the ranks,
    # so the weights follow the one-process run on 16 images (and rank 0 writes them).
    cfg = tiny_mlp(num_train=32, batch_size=16, sigreg="weak", crop_padding=0, flip=False,
                   epochs=2, alpha="auto")
    script = tmp_path / "run_ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    proc = run_two_ranks(script, cfg, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, single = epoch_rows(tmp_path / "ddp"), epoch_rows(_run(cfg, tmp_path / "single"))
    for got, want in zip(rows, single, strict=True):
        assert len(got["alpha_steps"]) == 2
        assert got["alpha_steps"] == pytest.approx(want["alpha_steps"], rel=1e-4)
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    assert rows[0]["alpha_steps"][0] != rows[-1]["alpha_steps"][-1]  # it moved


def _run(cfg: TrainConfig, out: Path) -> Path:
    train(cfg, out, progress=False, log=quiet)
    return out


# --------------------------------------------------------------------------- 5. overrides
def test_overrides_parse_values():
    base = TrainConfig()
    cfg = apply_overrides(base, [
        "sigreg=none", "sketch_dim=none", "model.dim=64", "model.blocks=[1,2]", "epochs=3.0",
        "lr=1e-2", "betas=[0.8,0.9]", "flip=false", "num_train=None", "optimizer=muon",
        "description=a b=c",
    ])
    assert cfg.sigreg == "none" and isinstance(cfg.sigreg, str)
    assert cfg.sketch_dim is None and cfg.num_train is None
    assert cfg.model_args == {"dim": 64, "blocks": [1, 2]}
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.lr == 0.01 and cfg.betas == (0.8, 0.9) and cfg.flip is False
    assert cfg.optimizer == "muon" and cfg.description == "a b=c"
    assert "sketch_dim" not in cfg.model_args and "dim" not in vars(cfg)
    # The input is left alone (model_args is copied, not shared).
    assert base.model_args == {} and base.sketch_dim == 64 and base.sigreg == "none"
    # Round trip: what the overrides produced is a valid config.
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unknown_setting_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'") as info:
        apply_overrides(TrainConfig(), ["learning_rate=0.1"])
    valid = str(info.value).split("valid:", 1)[1]
    for key in ("lr", "sigreg", "sketch_dim", "batch_size", "model.<arg>"):
        assert key in valid
    assert "model_args" not in valid
    with pytest.raises(ValueError, match="unknown setting 'model_args'"):
        apply_overrides(TrainConfig(), ["model_args={}"])


@pytest.mark.parametrize(("item", "message"), [
    ("epochs=abc", "epochs expects an integer"),
    ("epochs=1.5", "epochs expects an integer"),
    ("epochs=true", "epochs expects an integer"),
    ("batch_size=none", "batch_size cannot be none"),
    ("lr=fast", "lr expects a number"),
    ("lr=false", "lr expects a number"),
    ("flip=1", "flip expects true or false"),
    ("amp=yes", "amp expects true or false"),
    ("betas=0.9", "betas expects two numbers"),
    ("betas=[0.9,0.99,0.999]", "betas expects two numbers"),
    ("sigreg=medium", "sigreg must be one of none, weak, strong"),
    ("optimizer=adam", "optimizer must be one of sgd, adamw, muon"),
    ("sketch_policy=None", "sketch_policy must be one of resample, fixed"),
    ("lr", "expects key=value"),
    ("=3", "expects key=value"),
])
def test_bad_override_is_refused(item, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(TrainConfig(), [item])


def test_optional_string_keeps_its_text():
    for text in ("1e3", "true", "[1]", " ./data "):
        assert apply_overrides(TrainConfig(), [f"data_dir={text}"]).data_dir == text.strip()
    for text in ("none", "null", "None"):
        assert apply_overrides(TrainConfig(data_dir="x"), [f"data_dir={text}"]).data_dir is None


# --------------------------------------------------------------------------- 6. checkpoints
def test_checkpoint_is_weights_only_and_atomic(tmp_path):
    cfg = tiny_mlp(epochs=2, sigreg="strong", mixup_alpha=0.8, optimizer="muon")
    train(cfg, tmp_path, progress=False, log=quiet)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(state) == {"config", "epoch", "rows", "model", "optimizer", "sigreg", "rng_ranks",
                          "provenance"}
    assert [r["world_size"] for r in state["provenance"]] == [1]
    assert {k: len(v) for k, v in state["rng_ranks"].items()} == {"augmenter": 1, "cpu": 1}
    assert state["epoch"] == 2 and TrainConfig.from_dict(state["config"]) == cfg
    assert state["sigreg"]  # the regularizer's sketch state is saved
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


class _Payload:
    """Unpickling this runs os.makedirs(marker): code execution, if it is ever loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_resume_refuses_a_malicious_checkpoint(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"epoch": 1, "model": _Payload(marker)}, out / "checkpoint.pt")
    (out / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1}\n')

    with pytest.raises(pickle.UnpicklingError):
        train(tiny_mlp(), out, resume=True, progress=False, log=quiet)
    assert not marker.exists()
    # Nothing in the run directory was touched before the refusal.
    assert (out / "metrics.jsonl").read_text() == '{"kind": "epoch", "epoch": 1}\n'
    assert not (out / "config.json").exists()

    # The payload is live: an unsafe load would have run it.
    torch.load(out / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_tensorboard_gets_losses_and_effective_dimensions(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_mlp(sigreg="weak", epochs=2), tmp_path, progress=False, log=lambda _: None)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "reg_loss", "test_acc"} <= tags
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r["eff_dim"] for r in rows if r["kind"] == "monitor"]
    # One curve per regularized layer (the MLP's 2 hidden layers), each monitored step.
    layer_tags = {t for t in tags if t.startswith("eff_dim/")}
    assert layer_tags == {f"eff_dim/{name}" for name in logged[0]} and len(layer_tags) == 2
    for tag in layer_tags:
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(range(len(logged)))  # every monitored step
        name = tag.removeprefix("eff_dim/")
        assert [s.value for s in scalars] == pytest.approx([m[name] for m in logged], rel=1e-5)
    assert [s.step for s in events.Scalars("test_acc")] == [1, 2]


def test_rng_states_from_old_checkpoints_and_other_world_sizes():
    from sigreg.train.runtime import Runtime
    from sigreg.train.trainer import _own_rng_state

    cpu, aug = torch.get_rng_state(), torch.Generator().manual_seed(5).get_state()
    old_format = {"augmenter": {"generator": aug}, "rng_cpu": cpu}  # before per-rank states
    notes: list[str] = []
    got = _own_rng_state(old_format, Runtime(torch.device("cpu")), notes.append)
    assert torch.equal(got["augmenter"], aug) and torch.equal(got["cpu"], cpu) and notes == []

    per_rank = {"rng_ranks": {"augmenter": [aug, aug + 1], "cpu": [cpu, cpu + 1]}}
    got = _own_rng_state(per_rank, Runtime(torch.device("cpu"), rank=1, world_size=2), notes.append)
    assert torch.equal(got["augmenter"], aug + 1) and torch.equal(got["cpu"], cpu + 1)
    # Resumed on 3 ranks: the extra rank reuses rank 0's streams, and rank 0 says so.
    got = _own_rng_state(per_rank, Runtime(torch.device("cpu"), rank=2, world_size=3), notes.append)
    assert torch.equal(got["cpu"], cpu) and notes == []  # rank 2 does not log
    _own_rng_state(per_rank, Runtime(torch.device("cpu"), rank=0, world_size=3), notes.append)
    assert len(notes) == 1 and "2 rank(s), this job has 3" in notes[0]


# --------------------------------------------------------------------------- K per layer
def test_sketch_dim_per_layer_reaches_the_regularizer(tmp_path):
    """The same K for every layer is the plain sketch_dim run, metric for metric; different
    K per layer trains to other values and resumes exactly."""
    plain = train(tiny_mlp(sigreg="weak"), tmp_path / "plain", progress=False, log=quiet)
    same = train(tiny_mlp(sigreg="weak", sketch_dim=64, sketch_dim_per_layer="8,8"),
                 tmp_path / "same", progress=False, log=quiet)
    assert [flat(r) for r in epoch_rows(tmp_path / "plain")] == \
        [flat(r) for r in epoch_rows(tmp_path / "same")]
    assert plain["final_test_acc"] == same["final_test_acc"]

    mixed = tiny_mlp(sigreg="weak", sketch_policy="fixed", sketch_dim_per_layer="2,none", epochs=2)
    train(mixed, tmp_path / "mixed", progress=False, log=quiet)
    train(apply_overrides(mixed, ["epochs=1"]), tmp_path / "resumed", progress=False, log=quiet)
    train(mixed, tmp_path / "resumed", resume=True, progress=False, log=quiet)
    mixed_rows = [flat(r) for r in epoch_rows(tmp_path / "mixed")]
    assert mixed_rows == [flat(r) for r in epoch_rows(tmp_path / "resumed")]
    plain_rows = [flat(r) for r in epoch_rows(tmp_path / "plain")]
    assert mixed_rows[0]["reg_loss"] != plain_rows[0]["reg_loss"]
