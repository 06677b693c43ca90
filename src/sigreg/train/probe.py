"""Probe trained runs: representation diagnostics of every SIGReg layer on the test set.

``probe_run`` rebuilds a run's model from ``checkpoint.pt`` (config and weights), streams the
test split through it in eval mode and measures each of ``model.sigreg_layers`` with a
:class:`~sigreg.diagnostics.StreamingDiagnostics`, so the numbers cover the whole test set
without keeping its features. ``probe_runs`` does this for several runs and writes
``probe.json`` and ``probe.png``.

    sigreg probe --run runs/compare            # every run directory inside it
    sigreg probe --run runs/a runs/b --out runs/probe --max-samples 2000
    sigreg probe --run ~/ckpt/weak.pt --dataset fashion-mnist --data-dir /data   # a checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..attach import FeatureRecorder
from ..diagnostics import StreamingDiagnostics
from . import checkpoint
from .augment import AugmentConfig, BatchAugmenter
from .config import TrainConfig
from .models import build_model
from .trainer import load_data

CHECKPOINT = "checkpoint.pt"
# Metrics drawn in probe.png and shown in the markdown table, in this order.
PLOT_METRICS = ("effective_dim", "entropy_ratio", "mean_cosine", "norm_variance",
                "weak_sigreg_distance")

LayerMetrics = dict[str, dict[str, float]]


def checkpoint_path(run: str | Path) -> Path:
    """The checkpoint of a run directory, or ``run`` itself if it is a checkpoint file."""
    path = Path(run)
    if path.is_file():
        return path
    if (path / CHECKPOINT).is_file():
        return path / CHECKPOINT
    raise ValueError(f"no {CHECKPOINT} in {run}: train the run first (sigreg train), or pass "
                     "a checkpoint file")


@torch.no_grad()
def probe_run(run: str | Path, *, batch_size: int = 1000, max_samples: int | None = None,
              device: str | torch.device = "cpu", dataset: str | None = None,
              data_dir: str | None = None) -> LayerMetrics:
    """Diagnostics of each SIGReg layer of a trained run over a test set.

    Args:
        run: a run directory holding ``checkpoint.pt`` (written by :func:`train`), or a
            checkpoint file.
        batch_size: test images per forward pass.
        max_samples: probe only the first ``max_samples`` test images (None: all).
        device: where the model and data go.
        dataset: probe on this dataset's test split instead of the run's own (same image
            shape and number of classes; normalised with its own statistics).
        data_dir: where the dataset lives, if not where the run found it (for example a
            checkpoint copied to another machine).

    Returns:
        ``{layer name: diagnose-style metrics}``, layers in ``model.sigreg_layers`` order.
    """
    device = check_device(device)
    path = checkpoint_path(run)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_samples is not None and max_samples < 2:
        raise ValueError(f"max_samples must be at least 2, got {max_samples}")
    state = checkpoint.load(path, device)
    cfg = TrainConfig.from_dict(state["config"])
    trained_on = cfg.dataset
    if dataset is not None and dataset != cfg.dataset:
        # Another dataset's whole test split: the run's subset sizes are about its own data.
        cfg = dataclasses.replace(cfg, dataset=dataset, num_train=None, num_test=None)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    data = load_data(cfg)  # a run's own subset is seeded by cfg.seed, so it is the same one
    channels, height, _ = data.image_shape
    model = build_model(cfg.model, num_classes=data.num_classes, image_size=height,
                        in_channels=channels, **cfg.model_args).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"{path} holds a {cfg.model} trained on {trained_on}; it does not fit "
            f"{cfg.dataset} ({channels}x{height}x{height} images, {data.num_classes} classes): "
            f"{str(exc).splitlines()[0]}") from None
    model.eval()

    images, labels = data.test_images, data.test_labels
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    # Eval mode of the augmenter: normalisation only, exactly what evaluate() feeds the model.
    augmenter = BatchAugmenter(AugmentConfig(), data.mean, data.std)
    recorder = FeatureRecorder(model, model.sigreg_layers, model.sigreg_pool)
    stats = {name: StreamingDiagnostics() for name in recorder.names}
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            with recorder.recording():
                model(augmenter(x, y, train=False).images)
            for name, feats in recorder.features.items():
                stats[name].update(feats)
    finally:
        recorder.remove()
    return {name: s.compute() for name, s in stats.items()}


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device this machine has; ValueError naming ``--device`` and
    what to use instead (not a checkpoint error when the checkpoint is loaded onto it)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device}: not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: probing runs on cpu, cuda, cuda:N or mps")
    return dev


def find_run_dirs(paths: Sequence[str | Path]) -> dict[str, Path]:
    """Map run names to run directories (those holding ``checkpoint.pt``) or checkpoint files.

    A checkpoint file is one run, named after its directory (or its own name when that is
    not ``checkpoint.pt``); a directory with a checkpoint is one run, named after the
    directory; a directory without one (for example a ``sigreg compare`` output directory)
    contributes each immediate subdirectory that has one. Raises ValueError when a path
    yields no run at all.
    """
    runs: dict[str, Path] = {}

    def add(run: Path) -> None:
        # Named after the run directory, or after a checkpoint file not called checkpoint.pt.
        named = run.parent if run.name == CHECKPOINT and run.is_file() else run
        name = named.stem if named.is_file() else named.name
        if name in runs:  # same name from two places: qualify with the parent
            name = f"{named.parent.name}/{name}"
        runs[name] = run

    for raw in paths:
        path = Path(raw)
        if path.is_file():
            add(path)
            continue
        if not path.is_dir():
            raise ValueError(f"{path} is neither a run directory nor a checkpoint file")
        if (path / CHECKPOINT).is_file():
            add(path)
            continue
        found = sorted(d for d in path.iterdir() if d.is_dir() and (d / CHECKPOINT).is_file())
        if not found:
            raise ValueError(f"no {CHECKPOINT} in {path} or in its subdirectories: "
                             "pass a run directory or a compare/sweep output directory")
        for d in found:
            add(d)
    return runs


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def markdown(results: dict[str, LayerMetrics]) -> str:
    """One table row per (run, layer) with the plotted metrics."""
    cols = ("width", *PLOT_METRICS)
    lines = ["# Layer diagnostics on the test set", "",
             "| run | layer | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for run, layers in results.items():
        for layer, m in layers.items():
            lines.append(f"| {run} | {layer} | " + " | ".join(_fmt(m[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, LayerMetrics], path: Path) -> None:
    """One panel per metric of ``PLOT_METRICS``: layer index on x, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(4.2 * len(PLOT_METRICS), 4.2))
    for run, layers in results.items():
        xs = list(range(len(layers)))
        for ax, metric in zip(axes, PLOT_METRICS, strict=True):
            ax.plot(xs, [m[metric] for m in layers.values()], marker="o", label=run)
    for ax, metric in zip(axes, PLOT_METRICS, strict=True):
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("layer index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if results:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_runs(run_dirs: dict[str, Path], out: str | Path, *, batch_size: int = 1000,
               max_samples: int | None = None, device: str | torch.device = "cpu",
               dataset: str | None = None, data_dir: str | None = None,
               log: Any = print) -> str:
    """Probe each run (see :func:`probe_run`), write ``probe.json`` and ``probe.png`` into
    ``out``; return the markdown table."""
    out = Path(out)
    results: dict[str, LayerMetrics] = {}
    for i, (name, run_dir) in enumerate(run_dirs.items(), 1):
        log(f"[{i}/{len(run_dirs)}] probing {name} ({run_dir})")
        results[name] = probe_run(run_dir, batch_size=batch_size, max_samples=max_samples,
                                  device=device, dataset=dataset, data_dir=data_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "probe.png")
    return markdown(results)
