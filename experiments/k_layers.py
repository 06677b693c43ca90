"""K across layers. Is the best K a fraction of the width, and does it
differ between early and late layers? On the demo's 10-layer vanilla MLP (Fashion-MNIST,
plain SGD, 5 epochs, alpha 0.1), two parts:

- ``width``: weak SIGReg with the same K on every layer, K = C/16, C/4 and C (C: no sketch,
  the full covariance) at widths C = 128, 256 and 512.
- ``split``: width 256, K of the first 4 regularized layers against the last 5, each 16 or 256
  for weak and 8 or 64 directions for strong, through the trainer's ``sketch_dim_per_layer``
  setting (weak's uniform cells, the diagonal, are the width part's K 16 and 256 at 256).

Every cell is a preset plus ``--set`` items, trained into ``<out>/<part>-<cell>-s<seed>/`` with
:func:`sigreg.train.sweep.train_or_skip` (finished runs reused, interrupted ones resumed),
seed-major. Every invocation rewrites ``<out>/results.jsonl`` (one line per run, with its
provenance), then ``k_layers.md`` (mean ± sample std of the final test accuracy, and paired
differences over seeds with their 95 % interval: each K against the full covariance at its
width; each split cell against the uniform one of its variant, K 16 for weak and 64 for
strong) and ``k_layers.png``. ``--tables FILE`` prints the tables of a results file (the
committed raw file) without training.

    OMP_NUM_THREADS=1 PYTHONPATH=src python3 experiments/k_layers.py --out runs/k-layers
    # smoke test:
    PYTHONPATH=src python3 experiments/k_layers.py --out /tmp/kl --seeds 1 --widths 128 \\
        --set num_train=1000 num_test=500 epochs=1
    PYTHONPATH=src python3 experiments/k_layers.py --tables experiments/k-layers-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from _tables import (
    PAIRED_NOTE,
    by_seed,
    cell,
    mean_std,
    paired_text,
    read_jsonl,
    run_provenance,
    write_jsonl,
)

from sigreg.train.config import apply_overrides
from sigreg.train.presets import preset_config
from sigreg.train.sweep import train_or_skip
from sigreg.train.trainer import TrainingDiverged

WIDTHS = (128, 256, 512)
FRACTIONS = (16, 4, 1)  # K = C / fraction
EARLY = 4  # of the 9 regularized layers of the depth-10 MLP
SPLITS = {"weak": (16, 256), "strong": (8, 64)}  # the two K values each layer group takes
# The split cell the others are compared with: weak's best uniform K, strong's demo setting.
SPLIT_BASELINE = {"weak": 16, "strong": 64}


class Cell(NamedTuple):
    part: str
    name: str
    preset: str
    settings: tuple[str, ...]
    info: dict[str, Any]


def cells(widths: list[int]) -> list[Cell]:
    out = []
    for width in widths:
        for fraction in FRACTIONS:
            k = width // fraction
            out.append(Cell("width", f"w{width}-k{k}", "fmnist-mlp-weak",
                            (f"model.width={width}", f"sketch_dim={k}"),
                            {"variant": "weak", "width": width, "k": k, "fraction": 1 / fraction}))
    for variant, values in SPLITS.items():
        for early in values:
            for late in values:
                if variant == "weak" and early == late:
                    continue  # the width part's K 16 and K 256 cells at width 256
                dims = ",".join([str(early)] * EARLY + [str(late)] * (9 - EARLY))
                out.append(Cell("split", f"{variant}-e{early}-l{late}", f"fmnist-mlp-{variant}",
                                (f"sketch_dim_per_layer={dims}",),
                                {"variant": variant, "early": early, "late": late}))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/k-layers"))
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (default 2)")
    parser.add_argument("--wide-seeds", type=int, default=1,
                        help="seeds for width 512, ~4x the cost of 256 (default 1)")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--parts", nargs="+", default=["width", "split"],
                        choices=["width", "split"])
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="settings for every run, e.g. device=cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--tables", type=Path, metavar="RESULTS",
                        help="print the tables of a results file (results.jsonl or a committed "
                             "raw file) and train nothing")
    args = parser.parse_args(argv)
    if any(w < max(FRACTIONS) for w in args.widths):
        parser.error(f"--widths must be at least {max(FRACTIONS)} (K = width / {max(FRACTIONS)} "
                     "must be >= 1)")
    if args.seeds < 1 or args.wide_seeds < 0 or args.threads < 1:
        parser.error("--seeds and --threads must be at least 1, --wide-seeds at least 0")
    return args


def run_cell(cell: Cell, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) one run; its outcome as one results line."""
    cfg = apply_overrides(preset_config(cell.preset), [*args.set, *cell.settings, f"seed={seed}"])
    run_dir = args.out / f"{cell.part}-{cell.name}-s{seed}"
    line = {"part": cell.part, "cell": cell.name, "preset": cell.preset,
            "settings": list(cell.settings), "seed": seed, "dir": str(run_dir), **cell.info}
    try:
        summary = train_or_skip(cfg, run_dir, progress=False)
    except TrainingDiverged as exc:  # an outcome of the cell, not a failure of the study
        return {**line, "diverged": str(exc), "final_test_acc": None,
                "provenance": run_provenance(run_dir)}
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r]
    return {**line, "final_test_acc": summary["final_test_acc"],
            "test_acc": [r["test_acc"] for r in rows if r.get("kind") == "epoch"],
            "provenance": run_provenance(run_dir)}


def accuracies(results: list[dict[str, Any]], **match: Any) -> dict[int, float]:
    """``{seed: final test accuracy (%)}`` of the runs matching, diverged ones left out."""
    return by_seed(results, lambda r: None if r["final_test_acc"] is None
                   else 100 * r["final_test_acc"], **match)


def split_cell(results: list[dict[str, Any]], variant: str, early: int,
               late: int) -> dict[int, float]:
    """A split cell's accuracies; weak's uniform ones are the width part's runs at 256."""
    if variant == "weak" and early == late:
        return accuracies(results, part="width", width=256, k=early)
    return accuracies(results, part="split", variant=variant, early=early, late=late)


def markdown(results: list[dict[str, Any]], widths: list[int]) -> str:
    lines = ["Uniform K (weak), final test accuracy (%):", "",
             "| width | K = C/16 | K = C/4 | K = C (full) |", "|---|---|---|---|"]
    for width in widths:
        cells_ = [cell(list(accuracies(results, part="width", width=width,
                                       k=width // f).values())) for f in FRACTIONS]
        lines.append(f"| {width} | " + " | ".join(cells_) + " |")
    lines += ["", "Against the full covariance (points):", "",
              "| width | C/16 - full | C/4 - full |", "|---|---|---|"]
    for width in widths:
        full = accuracies(results, part="width", width=width, k=width)
        cells_ = [paired_text(accuracies(results, part="width", width=width, k=width // f),
                              full) for f in FRACTIONS[:-1]]
        lines.append(f"| {width} | " + " | ".join(cells_) + " |")
    for variant, (small, large) in SPLITS.items():
        title = (f"{variant}, width 256: K of the first {EARLY} layers (rows) and of the "
                 f"last {9 - EARLY} (columns):")
        lines += ["", title, "", f"| early \\ late | {small} | {large} |", "|---|---|---|"]
        for early in (small, large):
            row = [cell(list(split_cell(results, variant, early, late).values()))
                   for late in (small, large)]
            lines.append(f"| {early} | " + " | ".join(row) + " |")
        base = SPLIT_BASELINE[variant]
        lines += ["", f"{variant}, against K {base} on every layer (points):", "",
                  f"| early \\ late | {small} | {large} |", "|---|---|---|"]
        for early in (small, large):
            row = ["(baseline)" if early == late == base else
                   paired_text(split_cell(results, variant, early, late),
                               split_cell(results, variant, base, base))
                   for late in (small, large)]
            lines.append(f"| {early} | " + " | ".join(row) + " |")
    return "\n".join([*lines, "", PAIRED_NOTE]) + "\n"


def plot(results: list[dict[str, Any]], widths: list[int], path: Path) -> None:
    """Final accuracy against K / C (log axis), one line per width, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for width in widths:
        points = []
        for fraction in FRACTIONS:
            accs = [100 * r["final_test_acc"] for r in results if r["part"] == "width"
                    and r["width"] == width and r["k"] == width // fraction
                    and r["final_test_acc"] is not None]
            if accs:
                points.append((1 / fraction, *mean_std(accs)))
        if points:
            xs, means, stds = zip(*points, strict=True)
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"width {width}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K / width (1 = full covariance, no sketch)")
    ax.set_ylabel("final test accuracy (%), 5 epochs")
    ax.set_title("weak SIGReg, 10-layer MLP, Fashion-MNIST, alpha 0.1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tables:
        print(markdown(read_jsonl(args.tables), args.widths))
        return 0
    torch.set_num_threads(args.threads)
    grid = [c for c in cells(args.widths) if c.part in args.parts]
    runs = [(c, s) for s in range(args.seeds) for c in grid
            if c.info.get("width") != 512 or s < args.wide_seeds]
    results = []
    for i, (run, seed) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.part} {run.name} seed {seed}", flush=True)
        results.append(run_cell(run, seed, args))
        write_jsonl(args.out / "results.jsonl", results)
    table = markdown(results, args.widths)
    (args.out / "k_layers.md").write_text(table)
    plot(results, args.widths, args.out / "k_layers.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
