"""Sweep SIGReg's weight alpha and sketch size K over seeds, for one preset.

Every ``(alpha, K, seed)`` trains into ``out/a{alpha}-k{K}-s{seed}/``; a run whose
``summary.json`` exists is skipped and one with only a checkpoint is resumed, so an
interrupted sweep continues where it stopped. Then ``sweep.json``, ``sweep.md`` (rows alpha,
columns K, mean +- std of the final test accuracy over seeds) and ``sweep.png`` (heatmap)
are written into ``out``.

    sigreg sweep --preset fmnist-mlp-weak --alpha 0.01,0.03,0.1,0.3 --sketch-dim 16,64,256
    sigreg sweep ... --jobs 12 --set device=cuda      # 12 runs at a time on one GPU
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._words import count
from .config import TrainConfig, apply_overrides
from .presets import preset_config
from .rundir import FREE_ON_RESUME, SettingsChanged, claim
from .trainer import train

# Settings the sweep itself sets for every run; --set may not fight over them.
SWEPT_KEYS = ("alpha", "sketch_dim", "seed")


def parse_list(text: str, kind: type, option: str) -> list[Any]:
    """Parse ``"0.1,0.3"`` into numbers of type ``kind`` (float or int); ValueError if bad."""
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise ValueError(f"{option} expects a comma-separated list like 1,2,3, got {text!r}")
    values = []
    for t in items:
        try:
            value = kind(t)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ValueError(f"{option}: {t!r} is not {noun} (in {text!r})") from None
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{option}: {t!r} is not a finite number")
        values.append(value)
    if len(set(values)) != len(values):
        raise ValueError(f"{option} lists a value twice: {text!r}")
    return values


def run_name(alpha: float, sketch_dim: int, seed: int) -> str:
    """Directory name of one sweep run, e.g. ``a0.1-k64-s0``."""
    return f"a{alpha:g}-k{sketch_dim}-s{seed}"


def _check_grid(alphas: Sequence[float], sketch_dims: Sequence[int], seeds: Sequence[int]) -> None:
    if not alphas or not sketch_dims or not seeds:
        raise ValueError("a sweep needs at least one alpha, one sketch dim and one seed")
    for a in alphas:
        if not 0.0 < a < 1.0:
            raise ValueError(f"alpha weighs (1 - alpha) * task + alpha * reg: it must lie "
                             f"strictly between 0 and 1, got {a:g}")
    for k in sketch_dims:
        if k < 1:
            raise ValueError(f"sketch dims must be positive integers, got {k}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")


def base_config(preset: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """The preset with ``overrides`` applied, checked to be usable as a sweep base."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in SWEPT_KEYS:
            raise ValueError(f"--set {key}=... conflicts with the sweep: use --alpha, "
                             "--sketch-dim and --seeds instead")
        if key == "sketch_dim_per_layer":
            raise ValueError("--set sketch_dim_per_layer=... would override every swept K: "
                             "train each per-layer setting with `sigreg train` (see "
                             "experiments/k_layers.py)")
    cfg = apply_overrides(preset_config(preset), list(overrides))
    if cfg.sigreg == "none":
        raise ValueError(f"preset {preset!r} has sigreg=none, so alpha and K change nothing: "
                         "choose a -weak or -strong preset (e.g. fmnist-mlp-weak)")
    if cfg.sigreg == "vicreg":
        raise ValueError(f"preset {preset!r} is the VICReg-style baseline, which has no sketch "
                         "to size: choose a -weak or -strong preset")
    return cfg


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict as JSON would give it back, without the preset name (older runs lack it;
    equal settings are the same run) or settings that do not change results (device,
    monitor, ...: those a resume may change too).

    Settings added to TrainConfig after the run was saved take their defaults, so an older
    run still counts as the same run.
    """
    full = TrainConfig.from_dict(config).to_dict()
    ignored = {"preset", *FREE_ON_RESUME} - {"epochs"}  # settings that do not change results
    return {k: v for k, v in json.loads(json.dumps(full)).items() if k not in ignored}


def train_or_skip(cfg: TrainConfig, run_dir: Path, progress: bool,
                  log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``, or return its summary if it already finished there.

    A run with a checkpoint but no summary (interrupted) is resumed. A finished run whose
    config differs from ``cfg`` (device aside) is an error, not silently reused. A run that
    another process is writing (a concurrent sweep, an orphaned worker) is waited for, then
    looked at again: it is never written by two processes.
    """
    # Held from the look at summary.json to the end of training: a run found unfinished is
    # ours until we are done with it.
    with claim(run_dir, wait=True, log=log):
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if _comparable(summary["config"]) != _comparable(cfg.to_dict()):
                raise ValueError(f"{run_dir} holds a finished run with a different config; "
                                 "use another --out or delete that directory")
            log(f"  {run_dir.name}: done already, skipped")
            return summary
        try:
            return train(cfg, run_dir, resume="auto", progress=progress, log=log)
        except SettingsChanged as exc:  # its advice (--allow-change) is for `sigreg train`
            raise ValueError(f"{run_dir} holds an interrupted run with other settings; use "
                             "another --out or delete that directory") from exc


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def die_with_parent(parent: int) -> None:
    """End this process as soon as ``parent`` dies, however it dies (``kill -9`` included).

    The initializer of every worker process the toolkit starts: a worker left training after
    its sweep died would go on writing run directories that a rerun resumes beside it. On
    Linux the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``; the parent's
    thread that started the worker is its main thread); elsewhere (or if that fails) a thread
    looks for a new parent process every 0.2 s. A parent gone before this runs is caught by
    the first look.
    """
    pr_set_pdeathsig = 1
    asked = sys.platform.startswith("linux") and ctypes.CDLL(None, use_errno=True).prctl(
        pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0
    if not asked:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.2)
            os._exit(1)

        threading.Thread(target=watch, name="sigreg-die-with-parent", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was asked for
        os._exit(1)


def _train_in_worker(config: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    """One run in a worker process; its log lines go to ``run_dir/train.log``, not stdout."""
    import torch

    torch.set_num_threads(threads)
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    with (path / "train.log").open("a") as f:
        def log(line: str) -> None:
            f.write(line + "\n")
            f.flush()

        return train_or_skip(TrainConfig.from_dict(config), path, False, log)


def train_parallel(configs: dict[str, TrainConfig], out: Path, jobs: int,
                   log: Callable[[str], Any] = print) -> dict[str, dict[str, Any]]:
    """Train each config into ``out/<name>``, ``jobs`` at a time in spawned worker processes
    (safe with CUDA); return the summaries by name. Finished runs are checked here, with
    :func:`train_or_skip`, so no process starts for them. Stops at the first failure. The
    workers end with this process, however it ends (:func:`die_with_parent`).

    Small runs are bound by Python and kernel launches, so several processes fill a GPU, or
    several CPU cores, that one run leaves idle.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    summaries = {name: train_or_skip(cfg, out / name, False, log)
                 for name, cfg in configs.items() if (out / name / "summary.json").exists()}
    todo = {name: cfg for name, cfg in configs.items() if name not in summaries}
    if not todo:
        return summaries
    log(f"{len(todo)} runs to train, {jobs} at a time (logs in <run>/train.log)")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_train_in_worker, cfg.to_dict(), str(out / name), threads): name
                   for name, cfg in todo.items()}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                name = futures[future]
                summaries[name] = future.result()
                log(f"[{done}/{len(futures)}] {name}: final test acc "
                    f"{100 * summaries[name]['final_test_acc']:.2f}%")
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return summaries


def run_sweep(preset: str, alphas: Sequence[float], sketch_dims: Sequence[int],
              seeds: int | Sequence[int], out: str | Path, overrides: Sequence[str] = (), *,
              jobs: int = 1, progress: bool = False,
              log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train the grid, write ``sweep.json``, ``sweep.md`` and ``sweep.png``; return the results.

    Args:
        preset: a ``-weak`` or ``-strong`` preset name.
        alphas: regularizer weights, each in (0, 1).
        sketch_dims: sketch sizes K (weak) or numbers of directions (strong).
        seeds: a count n (seeds 0 .. n-1) or explicit seeds.
        out: sweep directory; run directories go inside it.
        overrides: ``key=value`` settings applied to the preset (not alpha/sketch_dim/seed).
        jobs: runs trained at once, each in its own process (its log in ``train.log`` of its
            run directory). 1: one after the other in this process.
        progress: show per-epoch progress bars (one run at a time only).
        log: where progress lines go.
    """
    out = Path(out)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    alphas, sketch_dims = list(alphas), list(sketch_dims)
    _check_grid(alphas, sketch_dims, seed_list)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    base = base_config(preset, overrides)
    grid = {run_name(alpha, k, seed): (alpha, k, seed)
            for alpha in alphas for k in sketch_dims for seed in seed_list}
    configs = {name: apply_overrides(base, [f"alpha={a!r}", f"sketch_dim={k}", f"seed={s}"])
               for name, (a, k, s) in grid.items()}
    if jobs == 1:
        summaries = {}
        for i, (name, cfg) in enumerate(configs.items(), 1):
            alpha, k, seed = grid[name]
            log(f"[{i}/{len(grid)}] {preset} alpha={alpha:g} K={k} seed={seed}")
            summaries[name] = train_or_skip(cfg, out / name, progress, log)
    else:
        summaries = train_parallel(configs, out, jobs, log)
    runs: list[dict[str, Any]] = []
    for name, (alpha, k, seed) in grid.items():
        summary = summaries[name]
        runs.append({"name": name, "alpha": alpha, "sketch_dim": k, "seed": seed,
                     "final_test_acc": summary["final_test_acc"],
                     "best_test_acc": summary["best_test_acc"],
                     "train_time_s": summary["train_time"],
                     # a run finished before provenance was recorded has none
                     "provenance": summary.get("provenance", [])})
    cells = []
    for alpha in alphas:
        for k in sketch_dims:
            accs = [r["final_test_acc"] for r in runs if r["alpha"] == alpha and r["sketch_dim"] == k]
            mean, std = _mean_std(accs)
            cells.append({"alpha": alpha, "sketch_dim": k, "mean_test_acc": mean,
                          "std_test_acc": std, "num_seeds": len(accs), "test_accs": accs})
    result = {"preset": preset, "sigreg": base.sigreg, "overrides": list(overrides),
              "epochs": base.epochs, "alphas": alphas, "sketch_dims": sketch_dims,
              "seeds": seed_list, "cells": cells, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sweep.md").write_text(markdown(result))
    plot_heatmap(result, out / "sweep.png")
    return result


def _cell(result: dict[str, Any], alpha: float, k: int) -> dict[str, Any]:
    return next(c for c in result["cells"] if c["alpha"] == alpha and c["sketch_dim"] == k)


def _spread(cell: dict[str, Any], sep: str) -> str:
    """``sep`` and the cell's std (%), or nothing for one seed (its std says nothing)."""
    return f"{sep}{100 * cell['std_test_acc']:.2f}" if cell["num_seeds"] > 1 else ""


def markdown(result: dict[str, Any]) -> str:
    """Rows alpha, columns K, cells mean +- std of the final test accuracy (%) over seeds."""
    ks = result["sketch_dims"]
    extra = f", settings {' '.join(result['overrides'])}" if result["overrides"] else ""
    spread = ("seed" if len(result["seeds"]) == 1 else "mean ± sample std over seeds")
    lines = [f"# Sweep of {result['preset']} (SIGReg {result['sigreg']})", "",
             (f"Final test accuracy (%), {spread} {result['seeds']}; "
              f"{count(result['epochs'], 'epoch')}{extra}."), "",
             "| alpha \\ K | " + " | ".join(str(k) for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for alpha in result["alphas"]:
        cells = []
        for k in ks:
            c = _cell(result, alpha, k)
            cells.append(f"{100 * c['mean_test_acc']:.2f}" + _spread(c, " ± "))
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_heatmap(result: dict[str, Any], path: Path) -> None:
    """Heatmap of the mean final test accuracy, each cell annotated with mean +- std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas, ks = result["alphas"], result["sketch_dims"]
    grid = [[100 * _cell(result, a, k)["mean_test_acc"] for k in ks] for a in alphas]
    fig, ax = plt.subplots(figsize=(1.6 * len(ks) + 2.5, 0.8 * len(alphas) + 2))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="mean final test acc (%)")
    lo, hi = min(min(r) for r in grid), max(max(r) for r in grid)
    for i, a in enumerate(alphas):
        for j, k in enumerate(ks):
            # Dark text on the bright end of viridis, light text elsewhere.
            bright = hi > lo and grid[i][j] > lo + 0.6 * (hi - lo)
            spread = _spread(_cell(result, a, k), "\n± ")
            ax.text(j, i, f"{grid[i][j]:.2f}{spread}", ha="center", va="center",
                    fontsize=9, color="black" if bright else "white")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_xlabel("sketch dim K")
    ax.set_ylabel("alpha")
    ax.set_title(f"{result['preset']}: {len(result['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
