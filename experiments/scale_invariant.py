"""The report phase of docs/studies.md section 14: the scale-invariant weak SIGReg
(``weak_sigreg(..., scale_invariant=True)``) against no regularizer and the paper's weak form
at each fixed alpha, on the report seeds 3-7 (the form and its alpha 0.1 were chosen on seed 0),
in the settings the issue named: the deep MLPs at depths 10 and 20 with default and He init,
the 5000-image ViT at lr 1e-3, 1e-2 (not run) and 3e-2, the byte-level LM at lr 1e-3 and 3e-2.

``--collect`` builds one raw file from what ran: every run folder under the given roots (a
``summary.json`` whose config says what ran: its model, depth, init, lr, alpha, and whether
``scale_invariant`` was on), every ``results.jsonl`` that ``experiments/char_lm.py`` wrote
there, and the rows of committed raw files that the report reuses (``--reuse``: the
initialisation control's none / weak 0.1 MLP runs, section 12's ViT runs), each row keeping its
provenance and naming its source. ``--tables`` prints, per setting, mean ± std over seeds for
every arm; every arm minus the baseline, paired over seeds; and the scale-invariant arm minus
the best fixed alpha of the paper's form there (best by its mean on these seeds, which favours
the fixed grid; ties go to the smallest alpha).

    PYTHONPATH=src python experiments/scale_invariant.py --collect runs/si \\
        --reuse experiments/mlp-init-cpu.jsonl experiments/vit-5k-heldout-cpu.jsonl \\
        --out experiments/scale-invariant-report-cpu.jsonl
    PYTHONPATH=src python experiments/scale_invariant.py --tables \\
        experiments/scale-invariant-report-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _tables import (PAIRED_NOTE, by_seed, cell, paired, paired_text, read_jsonl, run_provenance,
                     write_jsonl)

REPORT_SEEDS = (3, 4, 5, 6, 7)
# The settings, in the order the tables list them.
SETTINGS = ("mlp d10 default", "mlp d10 he", "mlp d20 default", "mlp d20 he",
            "vit-5k lr 0.001", "vit-5k lr 0.01", "vit-5k lr 0.03", "lm lr 0.001", "lm lr 0.03")
SCALE_INVARIANT = "scale-invariant"


def arm_name(sigreg: str, alpha: float | None, scale_invariant: bool,
             form: str = SCALE_INVARIANT) -> str:
    """``none``, ``weak 0.1``, ``scale-invariant 0.1``, ``strong 0.1``; ``form`` names the
    scale-invariant arm (it must start with "scale-invariant")."""
    if sigreg == "none":
        return "none"
    return f"{form if scale_invariant else sigreg} {alpha:g}"


def from_run(summary: dict[str, Any], run_dir: Path, form: str) -> dict[str, Any] | None:
    """A trainer run folder's row, or None for a run outside the report (another model, or a
    summary.json that is not a trainer run's)."""
    c = summary.get("config")
    if not isinstance(c, dict) or not isinstance(c.get("alpha"), (int, float)) \
            or "final_test_acc" not in summary:
        return None
    if c["model"] == "mlp":
        setting = f"mlp d{c['model_args']['depth']} {c['model_args'].get('init', 'default')}"
    elif (c.get("preset") or "").startswith("fmnist-vit-5k"):
        setting = f"vit-5k lr {c['lr']:g}"
    else:
        return None
    return {"setting": setting,
            "arm": arm_name(c["sigreg"], c["alpha"], c.get("scale_invariant", False), form),
            "seed": c["seed"], "metric": "test accuracy (%)",
            "value": 100 * summary["final_test_acc"], "source": str(run_dir),
            "provenance": run_provenance(run_dir)}


def from_char_lm(row: dict[str, Any], path: Path, form: str) -> dict[str, Any]:
    variant, _, scaled = row["arm"].partition("-")
    if "alpha" not in row:
        raise ValueError(f"{path}: a row without its alpha (written before char_lm.py recorded "
                         "it); rerun it or leave that folder out")
    return {"setting": f"lm lr {row['lr']:g}",
            "arm": arm_name(variant, row["alpha"], bool(scaled), form),
            "seed": row["seed"], "metric": "validation bits per byte",
            "value": row["final_val_bits"], "source": str(path),
            "provenance": row["provenance"]}


def from_committed(row: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """A row of the initialisation control (depth, init) or of section 12 (lr): both ran the
    presets' alpha 0.1 and the paper's form."""
    if "depth" in row:
        setting = f"mlp d{row['depth']} {row['init']}"
    elif "lr" in row:
        setting = f"vit-5k lr {row['lr']:g}"
    else:
        return None
    if row.get("state") != "finished":
        return None
    return {"setting": setting, "arm": arm_name(row["arm"], 0.1, False), "seed": row["seed"],
            "metric": "test accuracy (%)", "value": 100 * row["final_test_acc"],
            "source": path.name, "provenance": row["provenance"]}


def collect(roots: list[Path], reuse: list[Path], form: str = SCALE_INVARIANT) -> list[dict[str, Any]]:
    rows = []
    for root in roots:
        for summary in sorted(root.rglob("summary.json")):
            rows.append(from_run(json.loads(summary.read_text()), summary.parent, form))
        for results in sorted(root.rglob("results.jsonl")):
            rows += [from_char_lm(r, results, form) for r in read_jsonl(results)
                     if "final_val_bits" in r]
    for path in reuse:
        rows += [from_committed(r, path) for r in read_jsonl(path)]
    rows = [r for r in rows if r and r["setting"] in SETTINGS and r["seed"] in REPORT_SEEDS]
    if not rows:
        raise ValueError("nothing to collect: no finished run of the report's settings and "
                         f"seeds {REPORT_SEEDS} under the given folders")
    seen: dict[tuple, str] = {}
    for r in rows:  # one value per (setting, arm, seed): a second would be a rerun to choose from
        key = (r["setting"], r["arm"], r["seed"])
        if key in seen:
            raise ValueError(f"{key} twice: {seen[key]} and {r['source']}")
        seen[key] = r["source"]
    return sorted(rows, key=lambda r: (SETTINGS.index(r["setting"]), r["arm"], r["seed"]))


def _alpha(arm: str) -> float:
    return float(arm.split()[1]) if " " in arm else -1.0


def _best_fixed(rows: list[dict[str, Any]], setting: str, lower_better: bool) -> str | None:
    """The paper's weak form at the alpha with the best mean in ``setting`` (these seeds)."""
    means = {}
    arms = {r["arm"] for r in rows if r["setting"] == setting and r["arm"].startswith("weak ")}
    for arm in sorted(arms, key=_alpha):  # max / min keep the first: ties go to the smallest
        values = [r["value"] for r in rows if r["setting"] == setting and r["arm"] == arm]
        means[arm] = sum(values) / len(values)
    return (min if lower_better else max)(means, key=means.get, default=None)


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per metric: for each setting, the scale-invariant arm and the best fixed weak
    alpha minus the baseline, paired over seeds, with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [
                                 sum(1 for s in SETTINGS if any(r["setting"] == s and
                                                                 r["metric"] == m for r in rows))
                                 for m in metrics]})
    for ax, metric in zip(axes[0], metrics, strict=True):
        mrows = [r for r in rows if r["metric"] == metric]
        lower_better = metric.startswith("validation bits")
        settings = [s for s in SETTINGS if any(r["setting"] == s for r in mrows)]
        for i, setting in enumerate(settings):
            def values(arm: str, setting: str = setting) -> dict[int, float]:
                return by_seed(mrows, lambda r: r["value"], setting=setting, arm=arm)
            base = values("none")
            best = _best_fixed(mrows, setting, lower_better)
            ours = next((a for a in {r["arm"] for r in mrows if r["setting"] == setting}
                         if a.startswith(SCALE_INVARIANT)), None)
            for offset, arm, color in ((-0.15, best, "tab:orange"), (0.15, ours, "tab:red")):
                seeds = set(values(arm)) & set(base) if arm else set()
                if len(seeds) < 2:
                    continue
                p = paired({s: values(arm)[s] for s in seeds}, {s: base[s] for s in seeds})
                ax.errorbar(i + offset, p.mean, yerr=[[p.mean - p.low], [p.high - p.mean]],
                            fmt="o", color=color, capsize=3,
                            label=("best fixed weak alpha (its value)" if arm == best else
                                   "scale-invariant, the paper's alpha") if i == 0 else None)
                if arm == best:
                    ax.annotate(arm.split()[1], (i + offset, p.mean), xytext=(-4, 0),
                                textcoords="offset points", ha="right", va="center", fontsize=7)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(("bits / byte" if lower_better else "test accuracy (%)")
                      + ": arm - baseline" + (" (lower is better)" if lower_better else ""))
        ax.legend(fontsize=8)
    fig.suptitle("Report seeds 3-7: each arm minus no regularizer, paired, 95 % interval",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(rows: list[dict[str, Any]]) -> str:
    out = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        mrows = [r for r in rows if r["metric"] == metric]
        lower_better = metric.startswith("validation bits")
        settings = [s for s in SETTINGS if any(r["setting"] == s for r in mrows)]
        arms = sorted({r["arm"] for r in mrows}, key=lambda a: (a != "none",
                                                              a.startswith(SCALE_INVARIANT),
                                                              a.split()[0], _alpha(a)))

        def values(setting: str, arm: str) -> dict[int, float]:
            return by_seed(mrows, lambda r: r["value"], setting=setting, arm=arm)

        digits = 3 if lower_better else 2
        out += [f"Final {metric}, mean ± std over seeds"
                + (" (lower is better):" if lower_better else ":"), "",
                "| setting | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        out += [f"| {s} | " + " | ".join(cell(list(values(s, a).values()), digits) for a in arms)
                + " |" for s in settings]
        out += ["", PAIRED_NOTE, "", "| setting | " + " | ".join(f"{a} - none" for a in arms[1:])
                + " | scale-invariant - best fixed weak |", "|---" * (len(arms) + 1) + "|"]
        for s in settings:
            base = values(s, "none")
            cells = [paired_text(values(s, a), base, 2 if lower_better else 1) if base else "-"
                     for a in arms[1:]]
            ours = [a for a in arms if a.startswith(SCALE_INVARIANT) and values(s, a)]
            best = _best_fixed(mrows, s, lower_better)
            against = (f"{paired_text(values(s, ours[0]), values(s, best), 2 if lower_better else 1)}"
                       f" (best: {best})") if best and ours else "-"
            out.append(f"| {s} | " + " | ".join(cells) + f" | {against} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--collect", nargs="+", type=Path, metavar="ROOT",
                      help="folders holding the report's run folders and char_lm results")
    parser.add_argument("--reuse", nargs="*", type=Path, default=[], metavar="RAW",
                        help="committed raw files whose report-seed rows the report reuses")
    parser.add_argument("--out", type=Path, help="the raw file to write (with --collect)")
    parser.add_argument("--form", default=SCALE_INVARIANT,
                        help="with --collect: the scale-invariant arm's name (another form of "
                             "it than today's: e.g. scale-invariant-r for r at every scale)")
    mode.add_argument("--tables", type=Path, metavar="RAW", help="print a raw file's tables")
    parser.add_argument("--figure", type=Path, help="with --tables: also draw the paired "
                                                    "differences here (a .png)")
    args = parser.parse_args(argv)
    if args.collect:
        if args.out is None:
            parser.error("--collect needs --out")
        if args.figure:
            parser.error("--figure goes with --tables")
        if not args.out.parent.is_dir():
            parser.error(f"--out: no folder {args.out.parent}")
        missing = [p for p in [*args.collect, *args.reuse] if not p.exists()]
        if missing:
            parser.error(f"not found: {', '.join(map(str, missing))}")
        if not args.form.startswith(SCALE_INVARIANT) or " " in args.form:
            parser.error(f"--form must start with {SCALE_INVARIANT!r} and hold no space, "
                         f"got {args.form!r}")
        try:
            rows = collect(args.collect, args.reuse, args.form)
        except ValueError as err:  # nothing is written
            parser.error(str(err))
        write_jsonl(args.out, rows)
        print(tables(rows))
    else:
        if args.out or args.reuse or args.form != SCALE_INVARIANT:
            parser.error("--out, --reuse and --form go with --collect")
        if args.figure and args.figure.suffix != ".png":
            parser.error(f"--figure must name a .png file, got {args.figure}")
        if args.figure and not args.figure.parent.is_dir():
            parser.error(f"--figure: no folder {args.figure.parent}")
        if not args.tables.is_file():
            parser.error(f"--tables: no file {args.tables}")
        try:
            rows = read_jsonl(args.tables)
        except json.JSONDecodeError as err:
            parser.error(f"--tables: {args.tables} is not a JSON-lines file ({err})")
        if not rows or any({"setting", "arm", "seed", "metric", "value"} - set(r) for r in rows):
            parser.error(f"--tables: {args.tables} is not a raw file of this report (rows need "
                         "setting, arm, seed, metric, value)")
        print(tables(rows))
        if args.figure:
            figure(rows, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
