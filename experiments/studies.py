"""Two CPU-scale studies of the issue on Fashion-MNIST, with the ``fmnist-mlp-*`` presets.

The presets train a 10-layer vanilla MLP (width 256) with plain SGD for 5 epochs; one run
takes roughly 30-60 s on a CPU, much less on a GPU.

* ``sketch``: weak SIGReg with a fixed sketch (``sketch_policy=fixed``, drawn once) against
  a fresh sketch every step (``sketch_policy=resample``), same seeds and same epochs.
* ``variant``: no regularizer vs weak vs strong SIGReg vs the VICReg-style baseline
  (VICReg's variance + covariance terms on the full covariance, no sketch: the
  ``fmnist-mlp-vicreg`` preset) at equal epochs; the table also gives the training time
  per epoch (median over epochs, so the first epoch's warm-up does not count; evaluation
  excluded), the cost side of the comparison.

Identical runs are shared: ``variant``'s weak arm is ``sketch``'s resample arm. Each run
goes to ``<out>/<arm>-s<seed>/``; a run whose ``summary.json`` exists is reused, one with
only a checkpoint is resumed, so an interrupted study continues. Every invocation rewrites
``<out>/results.jsonl`` (one line per study, arm and seed, with the run's provenance) and
``<out>/studies.md`` and prints the markdown tables: mean ± sample std over seeds, then the
differences of ``PAIRS`` paired over seeds with their 95 % interval. ``--tables FILE`` prints
the tables of a results file (a committed raw file) without training.

    PYTHONPATH=src python3 experiments/studies.py --out runs/studies
    PYTHONPATH=src python3 experiments/studies.py --study variant --seeds 5 --set device=cuda \\
        --jobs 12      # 12 runs at a time on one GPU
    # smoke test:
    PYTHONPATH=src python3 experiments/studies.py --out /tmp/st --seeds 1 \\
        --set num_train=1000 num_test=500 epochs=1
    PYTHONPATH=src python3 experiments/studies.py --tables experiments/studies-gpu-h100.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from _tables import PAIRED_NOTE, by_seed, cell, paired_text, read_jsonl, run_provenance, write_jsonl

from sigreg.train.config import TrainConfig, apply_overrides
from sigreg.train.presets import preset_config
from sigreg.train.sweep import train_or_skip, train_parallel

# Arm -> (preset, settings). Each arm is trained once per seed, whichever study needs it.
ARMS: dict[str, tuple[str, list[str]]] = {
    "none": ("fmnist-mlp-none", []),
    "weak-resample": ("fmnist-mlp-weak", ["sketch_policy=resample"]),
    "weak-fixed": ("fmnist-mlp-weak", ["sketch_policy=fixed"]),
    "strong": ("fmnist-mlp-strong", []),
    "vicreg": ("fmnist-mlp-vicreg", []),
}
# Study -> {row label: arm}.
STUDIES: dict[str, dict[str, str]] = {
    "sketch": {"fixed": "weak-fixed", "resample": "weak-resample"},
    "variant": {"none": "none", "weak": "weak-resample", "strong": "strong", "vicreg": "vicreg"},
}
# Study -> (arm, baseline) pairs compared seed by seed: every arm against the study's
# baseline, and the VICReg-style arm against both SIGReg variants.
PAIRS: dict[str, list[tuple[str, str]]] = {
    "sketch": [("resample", "fixed")],
    "variant": [("weak", "none"), ("strong", "none"), ("vicreg", "none"), ("vicreg", "weak"),
                ("vicreg", "strong")],
}
# What the studies vary (sketch: sketch_policy's former name, still accepted by --set).
RESERVED = ("seed", "sigreg", "sketch_policy", "sketch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int,
                        help="epochs for every run (default: the presets' 5; wins over --set)")
    parser.add_argument("--out", type=Path, default=Path("runs/studies"))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings for every run, e.g. device=cuda num_train=10000")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once in separate processes (default 1); their "
                             "time per epoch is then not comparable between arms")
    parser.add_argument("--tables", type=Path, metavar="RESULTS",
                        help="print the tables of a results file (results.jsonl or a committed "
                             "raw file) and train nothing")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    for item in args.set:
        key = item.partition("=")[0].strip()
        if key in RESERVED:
            parser.error(f"--set {key}=... would change the studies' arms (use --seeds "
                         "for the seeds)")
    return args


def arm_config(arm: str, seed: int, args: argparse.Namespace) -> TrainConfig:
    preset, settings = ARMS[arm]
    extra = [f"epochs={args.epochs}"] if args.epochs is not None else []
    return apply_overrides(preset_config(preset), [*settings, *args.set, *extra, f"seed={seed}"])


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) one arm for one seed; return its accuracy and timing."""
    preset, settings = ARMS[arm]
    cfg = arm_config(arm, seed, args)
    run_dir = args.out / f"{arm}-s{seed}"
    summary = train_or_skip(cfg, run_dir, progress=not args.no_progress)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    return {
        "preset": preset, "settings": settings, "seed": seed, "epochs": len(epochs),
        "final_test_acc": summary["final_test_acc"], "best_test_acc": summary["best_test_acc"],
        "time_per_epoch_s": statistics.median(r["epoch_time"] for r in epochs),
        "images_per_s": statistics.median(r["images_per_s"] for r in epochs),
        "device": cfg.device, "dir": str(run_dir), "provenance": run_provenance(run_dir),
    }


def _mean_std(values: list[float]) -> str:
    return cell(values, count=False)


def accuracies(results: list[dict[str, Any]], study: str, arm: str) -> dict[int, float]:
    """``{seed: final test accuracy (%)}`` of one study's arm."""
    return by_seed(results, lambda r: 100 * r["final_test_acc"], study=study, arm=arm)


def paired_lines(results: list[dict[str, Any]]) -> list[str]:
    """The ``PAIRS`` differences in points, paired over seeds, one row per pair."""
    lines = ["| study | difference | final test acc (points) |", "|---|---|---|"]
    for study, pairs in PAIRS.items():
        for arm, base in pairs:
            text = paired_text(accuracies(results, study, arm), accuracies(results, study, base))
            if text != "-":
                lines.append(f"| {study} | {arm} - {base} | {text} |")
    return [*lines, "", PAIRED_NOTE]


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per (study, arm): mean ± std over seeds of accuracy (%) and time per epoch;
    then the paired differences."""
    seeds = len({r["seed"] for r in results})
    lines = ["# SIGReg studies (Fashion-MNIST, 10-layer MLP, plain SGD)", "",
             (f"Mean ± sample std over {seeds} seed(s). Time per epoch: median over "
              "epochs, training only."), "",
             "| study | arm | final test acc (%) | best test acc (%) | time / epoch (s) |",
             "|---|---|---|---|---|"]
    for study, labels in STUDIES.items():
        for label in labels:
            rows = [r for r in results if r["study"] == study and r["arm"] == label]
            if not rows:
                continue
            lines.append(
                f"| {study} | {label} | {_mean_std([100 * r['final_test_acc'] for r in rows])} | "
                f"{_mean_std([100 * r['best_test_acc'] for r in rows])} | "
                f"{_mean_std([r['time_per_epoch_s'] for r in rows])} |")
    return "\n".join([*lines, "", *paired_lines(results)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tables:
        print(markdown(read_jsonl(args.tables)))
        return 0
    studies = list(STUDIES) if args.study == "all" else [args.study]
    arms = list(dict.fromkeys(arm for s in studies for arm in STUDIES[s].values()))
    # Seed-major order: the arms of one seed run back to back, so a slow drift of the
    # machine's speed does not favour one arm's timings.
    done: dict[tuple[str, int], dict[str, Any]] = {}
    total = len(arms) * args.seeds
    try:
        if args.jobs > 1:  # train in parallel first; the loop below then finds them done
            train_parallel({f"{arm}-s{seed}": arm_config(arm, seed, args)
                            for seed in range(args.seeds) for arm in arms}, args.out, args.jobs)
        for seed in range(args.seeds):
            for arm in arms:
                print(f"[{len(done) + 1}/{total}] {arm} seed {seed}", flush=True)
                done[arm, seed] = run_arm(arm, seed, args)
    except ValueError as exc:
        print(f"studies: error: {exc}", file=sys.stderr)
        return 2
    results = [{"study": study, "arm": label, **done[arm, seed]}
               for study in studies for label, arm in STUDIES[study].items()
               for seed in range(args.seeds)]
    write_jsonl(args.out / "results.jsonl", results)
    table = markdown(results)
    (args.out / "studies.md").write_text(table)
    print()
    print(table)
    print(f"wrote {args.out / 'results.jsonl'} and {args.out / 'studies.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
