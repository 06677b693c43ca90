"""The initialisation control: does SIGReg's rescue of deep vanilla MLPs survive a proper initialisation?

The ``fmnist-mlp-d<depth>-<arm>`` presets (Fashion-MNIST, width 256, plain SGD lr 0.1, clip 1,
5 epochs; SIGReg alpha 0.1, K 64) with ``model.init`` set: PyTorch's default ``nn.Linear``
init (what the paper's code and our demo use), He (Kaiming-normal) or orthogonal. Each
(depth, init, arm, seed) trains into ``<out>/d<depth>-<init>-<arm>-s<seed>/``. The default
seeds are 3-7: the demo's setting was chosen on seeds 0-2.

    # 1. one line per run (its directory, then `sigreg train` arguments), for xargs:
    PYTHONPATH=src python3 experiments/init_control.py --out runs/mlp-init --commands | \\
        OMP_NUM_THREADS=1 PYTHONPATH=src xargs -P 2 -L 1 sh -c \\
        'mkdir -p "$0" && python3 -m sigreg.train.cli "$@" >> "$0/train.log" 2>&1'
    # 2. gather: results.jsonl, init_control.md (tables), init_control.png
    PYTHONPATH=src python3 experiments/init_control.py --out runs/mlp-init --collect
    # the tables (and figure) of a results file alone, e.g. the committed raw file:
    PYTHONPATH=src python3 experiments/init_control.py --tables experiments/mlp-init-cpu.jsonl \
        --figure docs/figures/init-control-cpu.png

Tables: final test accuracy (%) per (depth, init) and arm, mean ± std; each SIGReg arm minus
the baseline of the same init, paired over seeds with its 95 % interval; and the control a
reviewer asks for: each SIGReg arm on the default init minus the baseline on He init.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

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
from sigreg.train.models.mlp import INITS
from sigreg.train.presets import MLP_DEPTHS, VARIANTS, preset_config

ARMS = ("none", "weak", "strong")
assert set(ARMS) == set(VARIANTS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mlp-init"))
    parser.add_argument("--depths", type=int, nargs="+", default=list(MLP_DEPTHS),
                        choices=MLP_DEPTHS)
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings for every run, e.g. epochs=1 num_train=1000")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--commands", action="store_true",
                      help="print one `train` argument line per run, for xargs")
    mode.add_argument("--collect", action="store_true", help="gather finished runs")
    mode.add_argument("--tables", type=Path, metavar="RESULTS",
                      help="print the tables of a results file (a committed raw file); nothing "
                           "is gathered")
    parser.add_argument("--figure", type=Path, help="with --tables: also draw the figure here")
    return parser.parse_args(argv)


def grid(args: argparse.Namespace) -> list[tuple[int, str, str, int]]:
    # Seed-major: a pool stopped early still covers every cell once.
    return [(depth, init, arm, seed) for seed in args.seeds for depth in args.depths
            for init in args.inits for arm in args.arms]


def run_dir(out: Path, depth: int, init: str, arm: str, seed: int) -> Path:
    return out / f"d{depth}-{init}-{arm}-s{seed}"


def command(depth: int, init: str, arm: str, seed: int, args: argparse.Namespace) -> str:
    """``<run dir> train --preset ...`` (settings checked here, before any run starts)."""
    preset = f"fmnist-mlp-d{depth}-{arm}"
    settings = [*args.set, f"model.init={init}", f"seed={seed}"]
    apply_overrides(preset_config(preset), settings)
    out = run_dir(args.out, depth, init, arm, seed)
    return shlex.join([str(out), "train", "--preset", preset, "--out", str(out), "--resume",
                       "auto", "--no-progress", "--set", *settings])


def outcome(path: Path) -> dict[str, Any]:
    """A finished run's final and best test accuracy, curve and provenance; else its state."""
    where = {"provenance": run_provenance(path)}
    if not (path / "summary.json").exists():
        log = path / "train.log"
        diverged = log.exists() and "non-finite" in log.read_text()
        return {"state": "diverged" if diverged else "missing", "final_test_acc": None, **where}
    summary = json.loads((path / "summary.json").read_text())
    epochs = [r for r in read_jsonl(path / "metrics.jsonl") if r.get("kind") == "epoch"]
    return {"state": "finished", "final_test_acc": summary["final_test_acc"],
            "best_test_acc": summary["best_test_acc"],
            "test_acc": [r["test_acc"] for r in epochs],
            "train_time_s": summary["train_time"], **where}


def accuracies(results: list[dict[str, Any]], depth: int, init: str, arm: str) -> dict[int, float]:
    """``{seed: final test accuracy (%)}`` of a cell (diverged and missing runs left out)."""
    return by_seed(results, lambda r: None if r["final_test_acc"] is None
                   else 100 * r["final_test_acc"], depth=depth, init=init, arm=arm)


def markdown(results: list[dict[str, Any]], depths: list[int], inits: list[str],
             arms: list[str]) -> str:
    rows = [(depth, init) for depth in depths for init in inits]
    label = lambda row: f"{row[0]}, {row[1]}"

    def mean_cell(row: tuple[int, str], arm: str) -> str:
        return cell(list(accuracies(results, *row, arm).values()))

    means = grid_table("depth, init", rows, arms, mean_cell, label)
    against_same = paired_table("depth, init", rows, arms, "none",
                                lambda row, arm: accuracies(results, *row, arm), label)
    text = (f"Final test accuracy (%), mean ± std over seeds:\n\n{means}\n"
            f"Each arm minus the baseline of the same init, paired over seeds:\n\n"
            f"{against_same}\n")
    if "he" in inits and "none" in arms:
        # Every (init, arm) against the one-line fix: the baseline with He init.
        columns = [f"{init} {arm}" for init in inits for arm in arms]
        control = paired_table("depth", depths, columns, "he none",
                               lambda depth, column: accuracies(results, depth, *column.split()))
        text += ("\nThe control: every init and arm minus the baseline with He init, paired "
                 f"over seeds:\n\n{control}\n")
    return text + f"\n{PAIRED_NOTE}\n"


def plot(results: list[dict[str, Any]], depths: list[int], inits: list[str],
         arms: list[str], path: Path) -> None:
    """Final test accuracy against depth, one panel per init, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(inits), figsize=(4 * len(inits), 3.6), sharey=True,
                             squeeze=False)
    for ax, init in zip(axes[0], inits, strict=True):
        for arm in arms:
            points = [(d, *mean_std(list(accs.values()))) for d in depths
                      if (accs := accuracies(results, d, init, arm))]
            if points:
                xs, means, stds = zip(*points, strict=True)
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=arm)
        ax.axhline(10, color="grey", linestyle=":")
        ax.set_xticks(depths)
        ax.set_xlabel("depth (Linear layers)")
        ax.set_title(f"{init} init", fontsize=9)
    axes[0][0].set_ylabel("final test accuracy (%), 5 epochs")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Fashion-MNIST MLP width 256, plain SGD; mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.commands:
            print("\n".join(command(*cell_, args) for cell_ in grid(args)))
        elif args.tables:
            results = read_jsonl(args.tables)
            print(markdown(results, args.depths, args.inits, args.arms))
            if args.figure:
                plot(results, args.depths, args.inits, args.arms, args.figure)
        else:
            results = [{"depth": d, "init": i, "arm": a, "seed": s,
                        **outcome(run_dir(args.out, d, i, a, s))} for d, i, a, s in grid(args)]
            write_jsonl(args.out / "results.jsonl", results)
            table = markdown(results, args.depths, args.inits, args.arms)
            (args.out / "init_control.md").write_text(table)
            plot(results, args.depths, args.inits, args.arms, args.out / "init_control.png")
            print(table)
    except ValueError as exc:
        print(f"init_control: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
