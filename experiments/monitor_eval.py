"""Which live signal tells a failing run from a healthy one?

Reads the runs of ``experiments/soft_bn.py`` (every ``monitor`` row: per-layer effective
dimension ratio, mean cosine, feature variance, weak distance every 25 steps; every epoch's
test accuracy) and scores candidate warning rules against the outcome.

Outcome, per epoch: *bad* if its test accuracy is under 20 % (chance is 10 %), or if the run
ends more than 10 points under the best seed of the same preset and is that far under it at
that epoch; a run is *failing* if it has a bad epoch, *healthy* otherwise. A rule fires on a layer when its condition holds for
``patience`` consecutive measurements, once per episode (the episode ends when the condition
stops holding). A warning at step s is true if an epoch at or after s's epoch is bad, false
otherwise. Per rule: false-alarm runs (healthy runs with any warning), missed runs (failing
runs without a true warning), false warnings (lines), and lead = end step of the first bad
epoch - step of the first true warning (how far ahead of the accuracy curve it comes).
The rule is chosen on seeds 0 and 1 and checked on seed 2.

    PYTHONPATH=src python3 experiments/monitor_eval.py export runs/soft-bn \\
        experiments/soft-bn-cpu.jsonl.gz            # compact copy of the runs' rows
    PYTHONPATH=src python3 experiments/monitor_eval.py score experiments/soft-bn-cpu.jsonl.gz \\
        --out experiments/monitor-eval-cpu   # rules.md, rules.json, signals.png
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _tables import run_provenance

from sigreg.train import monitor

SIGNALS = ("eff_dim_ratio", "mean_cosine", "feature_var", "weak_distance")
CHANCE_BAND = 0.20  # test accuracy under this counts as "at chance"
FAR_BELOW = 0.10  # ... or this far under the best seed of the preset
HELD_OUT_SEED = 2


# ------------------------------------------------------------------- export
def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def export_run(run_dir: Path) -> dict[str, Any] | None:
    """One line: preset, seed, steps per epoch, test accuracy per epoch, per-layer series, and
    the run's provenance."""
    if not (run_dir / "summary.json").exists():
        return None
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    monitor = [r for r in rows if r.get("kind") == "monitor"]
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    # Optimizer steps per epoch: the images an epoch saw over the batch size.
    first = epochs[0]
    per_epoch = round(first["images_per_s"] * first["epoch_time"] / config["batch_size"])
    layers = list(monitor[0]["eff_dim_ratio"])
    return {"run": run_dir.name, "preset": config["preset"], "seed": config["seed"],
            "width": config["model_args"]["width"], "steps_per_epoch": per_epoch,
            "test_acc": [r["test_acc"] for r in epochs],
            "steps": [r["step"] for r in monitor],
            "series": {s: {layer: [_sig(r[s][layer]) for r in monitor] for layer in layers}
                       for s in SIGNALS},
            "provenance": run_provenance(run_dir)}


def export(runs: Path, out: Path) -> int:
    lines = [line for d in sorted(runs.iterdir()) if d.is_dir()
             if (line := export_run(d)) is not None]
    with gzip.open(out, "wt") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return len(lines)


def load(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------- outcome
def label(runs: list[dict[str, Any]]) -> None:
    """Add ``bad`` (per epoch) and ``failing`` to every run, in place."""
    for run in runs:
        peers = [r["test_acc"] for r in runs if r["preset"] == run["preset"]]
        best = [max(accs) for accs in zip(*peers, strict=True)]
        # Far below only counts for a run that ends far below: early curves of healthy seeds
        # differ by more than 10 points for an epoch or two.
        lagging = run["test_acc"][-1] < best[-1] - FAR_BELOW
        run["bad"] = [acc < CHANCE_BAND or (lagging and acc < b - FAR_BELOW)
                      for acc, b in zip(run["test_acc"], best, strict=True)]
        run["failing"] = any(run["bad"])


# ------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    signal: str
    op: str  # "<" or ">"
    threshold: float
    patience: int  # consecutive measurements

    @property
    def name(self) -> str:
        return f"{self.signal} {self.op} {self.threshold:g}, {self.patience} in a row"

    def holds(self, value: float, width: int) -> bool:
        if self.signal == "weak_distance":  # in units of sqrt(C): 1 when the features vanish
            value = value / math.sqrt(width)
        return value < self.threshold if self.op == "<" else value > self.threshold


def candidate_rules() -> Iterator[Rule]:
    grids = {("eff_dim_ratio", "<"): (0.01, 0.02, 0.03, 0.05),
             ("mean_cosine", ">"): (0.9, 0.95, 0.99, 0.999),
             ("feature_var", "<"): (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
             ("weak_distance", ">"): (2.0, 5.0, 10.0)}
    for (signal, op), thresholds in grids.items():
        for threshold in thresholds:
            for patience in (1, 2, 4, 8):
                yield Rule(signal, op, threshold, patience)


def warnings(rule: Rule, run: dict[str, Any]) -> list[tuple[str, int]]:
    """(layer, step) of every warning the rule gives in the run, once per layer per episode."""
    found = []
    for layer, values in run["series"][rule.signal].items():
        streak, warned = 0, False
        for step, value in zip(run["steps"], values, strict=True):
            if rule.holds(value, run["width"]):
                streak += 1
                if streak >= rule.patience and not warned:
                    found.append((layer, step))
                    warned = True
            else:
                streak, warned = 0, False
    return found


def score(rule: Rule, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """False-alarm and missed runs, false warnings and lead times of ``rule`` over ``runs``."""
    false_runs, missed, false_lines, leads = 0, 0, 0, []
    for run in runs:
        per = run["steps_per_epoch"]
        steps = [step for _, step in warnings(rule, run)]
        true_steps = [step for step in steps if any(run["bad"][step // per:])]
        false_lines += len(steps) - len(true_steps)
        if not run["failing"]:
            false_runs += bool(steps)
        elif true_steps:
            leads.append((run["bad"].index(True) + 1) * per - min(true_steps))
        else:
            missed += 1
    healthy = sum(not r["failing"] for r in runs)
    return {"rule": rule.name, "healthy": healthy, "failing": len(runs) - healthy,
            "false_alarm_runs": false_runs, "missed_runs": missed, "false_warnings": false_lines,
            "median_lead_steps": statistics.median(leads) if leads else None,
            "min_lead_steps": min(leads) if leads else None}


def errors(s: dict[str, Any]) -> int:
    return s["false_alarm_runs"] + s["missed_runs"]


def choose(rules: list[Rule], runs: list[dict[str, Any]]) -> Rule:
    """Fewest false-alarm + missed runs; then fewer false lines, longer lead, less patience."""
    def key(rule: Rule) -> tuple:
        s = score(rule, runs)
        lead = s["median_lead_steps"]
        return (errors(s), s["false_warnings"], -(lead if lead is not None else -1e9),
                rule.patience)
    return min(rules, key=key)


CURRENT = Rule("eff_dim_ratio", "<", 0.02, 1)  # the monitor's first default
DEFAULT = Rule(monitor.DEFAULT_SIGNAL, "<" if monitor.BELOW[monitor.DEFAULT_SIGNAL] else ">",
               monitor.DEFAULT_THRESHOLD, monitor.DEFAULT_PATIENCE)  # the monitor's default now


def _row(label: str, rule: Rule, parts: dict[str, list[dict[str, Any]]]) -> str:
    cells = []
    for runs in parts.values():
        s = score(rule, runs)
        lead = "-" if s["median_lead_steps"] is None else f"{s['median_lead_steps']:g}"
        cells.append(f"{s['false_alarm_runs']}/{s['healthy']} | {s['missed_runs']}/{s['failing']}"
                     f" | {s['false_warnings']} | {lead}")
    return f"| {label} | {rule.name} | " + " | ".join(cells) + " |"


def report(runs: list[dict[str, Any]], out: Path) -> Rule:
    """rules.md (old and new default, best rule per signal chosen on seeds 0-1), rules.json
    (every rule's scores), signals.png (old and new default's signal in every run)."""
    tune = [r for r in runs if r["seed"] != HELD_OUT_SEED]
    held = [r for r in runs if r["seed"] == HELD_OUT_SEED]
    parts = {"seeds 0-1 (chosen on)": tune, f"seed {HELD_OUT_SEED} (held out)": held,
             "all": runs}
    rules = list(candidate_rules())
    best = {signal: choose([r for r in rules if r.signal == signal], tune) for signal in SIGNALS}
    chosen = choose(list(best.values()), tune)
    header = " | ".join("false-alarm runs | missed runs | false warnings | median lead"
                        for _ in parts)
    lines = ["Columns per part: " + ", ".join(parts) + ".", "",
             f"| | rule | {header} |", "|---|---|" + "---|" * (4 * len(parts)),
             _row("old default", CURRENT, parts), _row("new default", DEFAULT, parts)]
    lines += [_row("chosen" if rule == chosen else "best of signal", rule, parts)
              for rule in best.values()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "rules.md").write_text("\n".join(lines) + "\n")
    (out / "rules.json").write_text(json.dumps(
        {"chosen": chosen.name, "runs": [{"run": r["run"], "failing": r["failing"],
                                          "test_acc": r["test_acc"]} for r in runs],
         "rules": {name: [score(rule, p) | {"part": name} for rule in rules]
                   for name, p in parts.items()}}, indent=1) + "\n")
    plot(runs, [CURRENT, DEFAULT], out / "signals.png")
    print("\n".join(lines))
    return chosen


def _extreme(rule: Rule, run: dict[str, Any]) -> list[float]:
    """Per measurement, the layer value nearest to firing (min for "<", max for ">")."""
    pick = min if rule.op == "<" else max
    scale = math.sqrt(run["width"]) if rule.signal == "weak_distance" else 1.0
    return [pick(v) / scale for v in zip(*run["series"][rule.signal].values(), strict=True)]


def plot(runs: list[dict[str, Any]], rules: list[Rule], path: Path) -> None:
    """One panel per rule: its signal over steps for every run, red failing, blue healthy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rules), figsize=(6 * len(rules), 4))
    for ax, rule in zip(axes, rules, strict=True):
        for run in runs:
            ax.plot(run["steps"], _extreme(rule, run), lw=0.7, alpha=0.6,
                    color="tab:red" if run["failing"] else "tab:blue")
        ax.axhline(rule.threshold, color="black", ls="--", lw=1)
        if rule.op == "<":  # small positive quantities; a cosine can be negative
            ax.set_yscale("log")
        ax.set_xlabel("step")
        word = "lowest" if rule.op == "<" else "highest"
        ax.set_ylabel(f"{rule.signal} ({word} layer)")
        ax.set_title(f"{rule.name}\nred: failing runs, blue: healthy")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("runs", type=Path)
    ex.add_argument("file", type=Path)
    sc = sub.add_parser("score")
    sc.add_argument("file", type=Path)
    sc.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "export":
        print(f"exported {export(args.runs, args.file)} runs to {args.file}")
        return 0
    runs = load(args.file)
    label(runs)
    report(runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
