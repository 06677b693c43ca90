"""Comparison report of finished runs: results.json, report.md and curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .presets import PRESETS


def read_run(run_dir: Path) -> dict[str, Any]:
    """Summary, epoch rows and monitor rows of one run directory."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "dir": run_dir,
        "summary": summary,
        "epochs": [r for r in rows if r["kind"] == "epoch"],
        "monitor": [r for r in rows if r["kind"] == "monitor"],
    }


def results(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Machine-readable final and best metrics per run."""
    out = {}
    for name, run in runs.items():
        last = run["epochs"][-1]
        cfg = run["summary"]["config"]
        preset = PRESETS.get(name)
        out[name] = {
            "sigreg": cfg["sigreg"], "model": cfg["model"], "optimizer": cfg["optimizer"],
            "dataset": cfg["dataset"], "seed": cfg["seed"], "epochs": cfg["epochs"],
            "final_test_acc": last["test_acc"], "final_test_loss": last["test_loss"],
            "final_train_loss": last["train_loss"],
            "best_test_acc": run["summary"]["best_test_acc"],
            "best_epoch": run["summary"]["best_epoch"],
            "train_time_s": run["summary"]["train_time"],
            "images_per_s": sum(r["images_per_s"] for r in run["epochs"]) / len(run["epochs"]),
            "paper_top1": preset.paper if preset else None,
        }
    return out


def _row_key(name: str, res: dict[str, Any]) -> str:
    """Runs that differ only in the regularizer share a table row."""
    suffix = f"-{res['sigreg']}"
    return name.removesuffix(suffix)


def markdown(res: dict[str, Any]) -> str:
    """The paper's table layout (none / strong / weak [/ vicreg] columns), then one line per run."""
    table: dict[str, dict[str, str]] = {}
    for name, r in res.items():
        cell = f"{100 * r['final_test_acc']:.2f} (best {100 * r['best_test_acc']:.2f})"
        table.setdefault(_row_key(name, r), {})[r["sigreg"]] = cell
    # The VICReg-style baseline gets a column only when some run used it.
    columns = ["none", "strong", "weak"] + (["vicreg"] if any(
        r["sigreg"] == "vicreg" for r in res.values()) else [])
    lines = ["# SIGReg comparison", "",
             "Test top-1 (%) at the last epoch, best epoch in brackets.", "",
             "| setting | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, cells in table.items():
        lines.append(f"| {key} | " + " | ".join(cells.get(v, "-") for v in columns) + " |")
    lines += ["", ("| run | regularizer | epochs | final acc | best acc (epoch) | final train loss "
                   "| train time (s) | images/s | paper top-1 |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        paper = f"{r['paper_top1']:.2f}" if r["paper_top1"] is not None else "-"
        lines.append(
            f"| {name} | {r['sigreg']} | {r['epochs']} | {100 * r['final_test_acc']:.2f} | "
            f"{100 * r['best_test_acc']:.2f} ({r['best_epoch']}) | {r['final_train_loss']:.4f} | "
            f"{r['train_time_s']:.1f} | {r['images_per_s']:.0f} | {paper} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Test accuracy, losses and mean effective dimension over training, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for name, run in runs.items():
        ep = [r["epoch"] for r in run["epochs"]]
        axes[0].plot(ep, [100 * r["test_acc"] for r in run["epochs"]], marker="o", label=name)
        axes[1].plot(ep, [r["task_loss"] for r in run["epochs"]], marker="o", label=name)
        axes[2].plot(ep, [r["test_loss"] for r in run["epochs"]], marker="o", label=name)
        mon = [r for r in run["monitor"] if r["eff_dim"]]
        if mon:
            mean_dim = [sum(r["eff_dim"].values()) / len(r["eff_dim"]) for r in mon]
            axes[3].plot([r["step"] for r in mon], mean_dim, label=name)
    titles = ("test accuracy (%)", "train task loss", "test loss",
              "effective dimension (mean over layers)")
    xlabels = ("epoch", "epoch", "epoch", "step")
    for ax, title, xlabel in zip(axes, titles, xlabels, strict=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dirs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Write results.json, report.md and curves.png into ``out``; return the results."""
    runs = {name: read_run(d) for name, d in run_dirs.items()}
    res = results(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "report.md").write_text(markdown(res))
    plot_curves(runs, out / "curves.png")
    return res
