"""Is SIGReg a "soft BatchNorm"? Deep vanilla MLPs + SIGReg vs the same nets with
BatchNorm, LayerNorm or residual connections, on Fashion-MNIST (the ``fmnist-mlp-d*`` presets).

Every (depth, arm, seed) trains into ``<out>/d<depth>-<arm>-s<seed>/`` with
:func:`sigreg.train.sweep.train_or_skip` (finished runs are reused, interrupted ones resumed),
one at a time in this process, seed-major (all cells of seed 0 first) so a cut-short study
still covers every cell. A run whose loss turns non-finite is recorded as diverged. Every
invocation rewrites ``<out>/results.jsonl`` (one line per finished run, with its per-epoch
test accuracy and the run's provenance), then ``soft_bn.md`` (mean ± sample std of the final
test accuracy, and each arm minus ``--baseline`` paired over seeds with its 95 % interval)
and ``soft_bn.png`` (accuracy against depth, one line per arm). ``--tables FILE`` prints the
two tables from a results file (the committed raw file) without training.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 experiments/soft_bn.py --out runs/soft-bn
    # smoke test:
    PYTHONPATH=src python3 experiments/soft_bn.py --out /tmp/sb --seeds 1 --depths 10 \\
        --set num_train=1000 num_test=500 epochs=1
    # the tables of the committed runs, against BatchNorm:
    PYTHONPATH=src python3 experiments/soft_bn.py --tables experiments/soft-bn-cpu.jsonl \\
        --baseline bn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from _tables import (
    PAIRED_NOTE,
    by_seed,
    cell,
    grid_table,
    mean_std,
    paired_table,
    read_jsonl,
    run_provenance,
    write_jsonl,
)

from sigreg.train.config import apply_overrides
from sigreg.train.presets import MLP_DEPTHS, MLP_PRIORS, VARIANTS, preset_config
from sigreg.train.sweep import train_or_skip
from sigreg.train.trainer import TrainingDiverged

ARMS = (*VARIANTS, *MLP_PRIORS)  # none, strong, weak, bn, ln, res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/soft-bn"))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--depths", type=int, nargs="+", default=list(MLP_DEPTHS),
                        choices=MLP_DEPTHS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings for every run, e.g. device=cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--baseline", default="none", choices=ARMS,
                        help="the arm the paired differences are taken against (default none)")
    parser.add_argument("--tables", type=Path, metavar="RESULTS",
                        help="print the tables of a results file (results.jsonl or a committed "
                             "raw file) and train nothing")
    return parser.parse_args(argv)


def epoch_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [r for r in rows if r.get("kind") == "epoch"]


def run_cell(depth: int, arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) one run; its outcome as one results line."""
    preset = f"fmnist-mlp-d{depth}-{arm}"
    cfg = apply_overrides(preset_config(preset), [*args.set, f"seed={seed}"])
    run_dir = args.out / f"d{depth}-{arm}-s{seed}"
    line = {"preset": preset, "depth": depth, "arm": arm, "seed": seed, "dir": str(run_dir)}
    try:
        summary = train_or_skip(cfg, run_dir, progress=False)
    except TrainingDiverged as exc:  # an outcome of the arm, not a failure of the study
        return {**line, "diverged": str(exc), "final_test_acc": None,
                "provenance": run_provenance(run_dir)}
    epochs = epoch_rows(run_dir)
    return {**line, "final_test_acc": summary["final_test_acc"],
            "best_test_acc": summary["best_test_acc"],
            "test_acc": [r["test_acc"] for r in epochs],
            "time_per_epoch_s": statistics.median(r["epoch_time"] for r in epochs),
            "provenance": run_provenance(run_dir)}


def accuracies(results: list[dict[str, Any]], depth: int, arm: str) -> dict[int, float]:
    """``{seed: final test accuracy (%)}`` of a cell, diverged runs left out."""
    return by_seed(results, lambda r: None if r["final_test_acc"] is None
                   else 100 * r["final_test_acc"], depth=depth, arm=arm)


def markdown(results: list[dict[str, Any]], depths: list[int], arms: list[str],
             baseline: str = "none") -> str:
    """Rows depth, columns arm: mean ± std of the final test accuracy (%) over seeds; then
    every arm minus ``baseline`` (points), paired over seeds."""
    means = grid_table("depth", depths, arms,
                       lambda depth, arm: cell(list(accuracies(results, depth, arm).values())))
    paired = paired_table("depth", depths, arms, baseline,
                          lambda depth, arm: accuracies(results, depth, arm))
    return f"{means}\n{PAIRED_NOTE}\n\n{paired}"


def plot(results: list[dict[str, Any]], depths: list[int], arms: list[str], path: Path) -> None:
    """Final test accuracy against depth, mean ± std over seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        points = []
        for depth in depths:
            accs = [100 * r["final_test_acc"] for r in results
                    if r["depth"] == depth and r["arm"] == arm and r["final_test_acc"] is not None]
            if accs:
                points.append((depth, *mean_std(accs)))
        if points:
            xs, means, stds = zip(*points, strict=True)
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=arm)
    ax.axhline(10, color="grey", linestyle=":", label="chance")
    ax.set_xticks(depths)
    ax.set_xlabel("depth (Linear layers)")
    ax.set_ylabel("final test accuracy (%), 5 epochs")
    ax.set_title("Fashion-MNIST MLP width 256, plain SGD")
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tables:
        print(markdown(read_jsonl(args.tables), args.depths, args.arms, args.baseline))
        return 0
    torch.set_num_threads(args.threads)
    cells = [(d, a, s) for s in range(args.seeds) for d in args.depths for a in args.arms]
    results = []
    for i, (depth, arm, seed) in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] depth {depth} {arm} seed {seed}", flush=True)
        results.append(run_cell(depth, arm, seed, args))
        write_jsonl(args.out / "results.jsonl", results)
    table = markdown(results, args.depths, args.arms, args.baseline)
    (args.out / "soft_bn.md").write_text(table)
    plot(results, args.depths, args.arms, args.out / "soft_bn.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
