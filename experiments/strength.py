"""Issue 22's reports (docs/studies.md, sections 14 and 15): how strong SIGReg should be
without tuning. Arms: no regularizer, the paper's weak form at each fixed alpha, the
scale-invariant weak form (``weak_sigreg(..., scale_invariant=True)``) at the paper's alpha,
and the weight that sets itself (``alpha="auto"``, sigreg.auto, with the scale-invariant
form), on the report seeds 3-7 (the form, its alpha and the rule were chosen on seeds 0-2),
in the settings the issue named: the deep MLPs at depths 10 and 20 with default and He init,
the 5000-image ViT at lr 1e-3, 1e-2 and 3e-2, the byte-level LM at lr 1e-3 and 3e-2.

``--collect`` builds one raw file from what ran: every run folder under the given roots (a
``summary.json`` whose config says what ran: its model, depth, init, lr, alpha, and whether
``scale_invariant`` was on), every ``results.jsonl`` that ``experiments/char_lm.py`` wrote
there, and the rows of committed raw files that the report reuses (``--reuse``: the
initialisation control's none / weak 0.1 MLP runs, section 12's ViT runs, or an earlier
report's raw file), each row keeping its provenance and naming its source; an ``auto`` run's
row also keeps its weight over training (``alpha_steps``, at most 200 points). ``--tables``
prints, per setting, mean ± std over seeds for every arm; every arm minus the baseline,
paired over seeds; and the scale-invariant and auto arms minus the best fixed alpha of the
paper's form there (best by its mean on these seeds, which favours the fixed grid; ties go
to the smallest alpha). ``--figure`` draws those paired differences, ``--weights`` the auto
runs' alpha over training.

    PYTHONPATH=src python experiments/strength.py --collect runs/auto-report \
        --reuse experiments/scale-invariant-report-cpu.jsonl \
        --out experiments/auto-weight-report-cpu.jsonl
    PYTHONPATH=src python experiments/strength.py --tables \
        experiments/auto-weight-report-cpu.jsonl --weights docs/figures/auto-weight-cpu.png
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
AUTO = "auto"
TRAJECTORY_POINTS = 200


def arm_name(sigreg: str, alpha: float | str | None, scale_invariant: bool,
             form: str = SCALE_INVARIANT, rule: str = AUTO) -> str:
    """``none``, ``weak 0.1``, ``scale-invariant 0.1``, ``strong 0.1``, ``scale-invariant
    auto``; ``form`` names the scale-invariant arm (it must start with "scale-invariant"),
    ``rule`` the auto arm's weight (a design rule's runs: e.g. "auto-share")."""
    if sigreg == "none":
        return "none"
    return f"{form if scale_invariant else sigreg} {rule if alpha == AUTO else f'{alpha:g}'}"


def thinned(values: list[float]) -> list[float]:
    """At most TRAJECTORY_POINTS evenly spaced values, the last included."""
    step = max(1, -(-len(values) // TRAJECTORY_POINTS))
    return values[::-1][::step][::-1]


def _run_alphas(run_dir: Path) -> list[float]:
    """An auto run's weight at every step, from its epoch rows."""
    steps = []
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        if row.get("kind") == "epoch":
            steps += row.get("alpha_steps") or []
    return steps


def from_run(summary: dict[str, Any], run_dir: Path, form: str,
             rule: str = AUTO) -> dict[str, Any] | None:
    """A trainer run folder's row, or None for a run outside the report (another model, or a
    summary.json that is not a trainer run's)."""
    c = summary.get("config")
    if not isinstance(c, dict) or not (isinstance(c.get("alpha"), (int, float))
                                       or c.get("alpha") == AUTO) \
            or "final_test_acc" not in summary:
        return None
    if c["model"] == "mlp":
        setting = f"mlp d{c['model_args']['depth']} {c['model_args'].get('init', 'default')}"
    elif (c.get("preset") or "").startswith("fmnist-vit-5k"):
        setting = f"vit-5k lr {c['lr']:g}"
    else:
        return None
    return {"setting": setting,
            "arm": arm_name(c["sigreg"], c["alpha"], c.get("scale_invariant", False), form,
                            rule),
            "seed": c["seed"], "metric": "test accuracy (%)",
            "value": 100 * summary["final_test_acc"], "source": str(run_dir),
            "provenance": run_provenance(run_dir),
            **({"alpha_steps": thinned(_run_alphas(run_dir))} if c["alpha"] == AUTO else {})}


def from_char_lm(row: dict[str, Any], path: Path, form: str,
                 rule: str = AUTO) -> dict[str, Any]:
    variant, _, scaled = row["arm"].partition("-")
    if "alpha" not in row:
        raise ValueError(f"{path}: a row without its alpha (written before char_lm.py recorded "
                         "it); rerun it or leave that folder out")
    return {"setting": f"lm lr {row['lr']:g}",
            "arm": arm_name(variant, row["alpha"], bool(scaled), form,
                            rule if row.get("auto_base", 0.1) == 0.1 else
                            f"{rule}-base{row['auto_base']:g}"),
            "seed": row["seed"], "metric": "validation bits per byte",
            "value": row["final_val_bits"], "source": str(path),
            "provenance": row["provenance"],
            **({"alpha_steps": thinned(row["alpha_steps"])} if row["alpha"] == AUTO else {})}


def from_committed(row: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """A row of an earlier report's raw file (as it is), of the initialisation control (depth,
    init) or of section 12 (lr): both ran the presets' alpha 0.1 and the paper's form."""
    if {"setting", "arm", "metric", "value"} <= set(row):
        return row
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


def collect(roots: list[Path], reuse: list[Path], form: str = SCALE_INVARIANT,
            seeds: tuple[int, ...] = REPORT_SEEDS, rule: str = AUTO) -> list[dict[str, Any]]:
    rows = []
    for root in roots:
        for summary in sorted(root.rglob("summary.json")):
            rows.append(from_run(json.loads(summary.read_text()), summary.parent, form, rule))
        for results in sorted(root.rglob("results.jsonl")):
            rows += [from_char_lm(r, results, form, rule) for r in read_jsonl(results)
                     if "final_val_bits" in r]
    for path in reuse:
        rows += [from_committed(r, path) for r in read_jsonl(path)]
    rows = [r for r in rows if r and r["setting"] in SETTINGS and r["seed"] in seeds]
    if not rows:
        raise ValueError("nothing to collect: no finished run of the report's settings and "
                         f"seeds {seeds} under the given folders")
    seen: dict[tuple, str] = {}
    for r in rows:  # one value per (setting, arm, seed): a second would be a rerun to choose from
        key = (r["setting"], r["arm"], r["seed"])
        if key in seen:
            raise ValueError(f"{key} twice: {seen[key]} and {r['source']}")
        seen[key] = r["source"]
    return sorted(rows, key=lambda r: (SETTINGS.index(r["setting"]), r["arm"], r["seed"]))


def _alpha(arm: str) -> float:
    if " " not in arm:
        return -1.0
    weight = arm.split()[1]
    return float("inf") if weight.startswith(AUTO) else float(weight)


def _ours(arms: list[str]) -> list[str]:
    """The arms judged against the best fixed alpha: scale-invariant, then auto."""
    return sorted((a for a in arms if a.startswith(SCALE_INVARIANT)
                   or a.split()[-1].startswith(AUTO)), key=lambda a: (_alpha(a), a))


def _variant(arm: str) -> str:
    """The paper's form an arm is judged against: weak for the scale-invariant arms."""
    return "weak" if arm.startswith(SCALE_INVARIANT) else arm.split()[0]


def _best_fixed(rows: list[dict[str, Any]], setting: str, lower_better: bool,
                variant: str = "weak") -> str | None:
    """The paper's form of ``variant`` at the fixed alpha with the best mean in ``setting``
    (these seeds)."""
    means = {}
    arms = {r["arm"] for r in rows if r["setting"] == setting
            and r["arm"].startswith(variant + " ") and _alpha(r["arm"]) != float("inf")}
    for arm in sorted(arms, key=_alpha):  # max / min keep the first: ties go to the smallest
        values = [r["value"] for r in rows if r["setting"] == setting and r["arm"] == arm]
        means[arm] = sum(values) / len(values)
    return (min if lower_better else max)(means, key=means.get, default=None)


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per metric: for each setting, the weak scale-invariant arms and the best fixed weak
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
        labelled: set[str] = set()
        for i, setting in enumerate(settings):
            def values(arm: str, setting: str = setting) -> dict[int, float]:
                return by_seed(mrows, lambda r: r["value"], setting=setting, arm=arm)
            base = values("none")
            best = _best_fixed(mrows, setting, lower_better)
            ours = [a for a in _ours(sorted({r["arm"] for r in mrows if r["setting"] == setting}))
                    if _variant(a) == "weak"]
            plotted = [(best, "tab:orange")] + list(zip(ours, ("tab:red", "tab:purple")))
            for k, (arm, color) in enumerate(plotted):
                seeds = set(values(arm)) & set(base) if arm else set()
                if len(seeds) < 2:
                    continue
                offset = 0.2 * (k - 1)
                p = paired({s: values(arm)[s] for s in seeds}, {s: base[s] for s in seeds})
                label = ("best fixed weak alpha (its value)" if arm == best else
                         "scale-invariant, alpha auto" if arm.endswith(AUTO) else
                         "scale-invariant, the paper's alpha")
                ax.errorbar(i + offset, p.mean, yerr=[[p.mean - p.low], [p.high - p.mean]],
                            fmt="o", color=color, capsize=3,
                            label=label if label not in labelled else None)
                labelled.add(label)
                if arm == best:
                    ax.annotate(arm.split()[1], (i + offset, p.mean), xytext=(-4, 0),
                                textcoords="offset points", ha="right", va="center", fontsize=7)
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(settings)), settings, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(("bits / byte" if lower_better else "test accuracy (%)")
                      + ": arm - baseline" + (" (lower is better)" if lower_better else ""))
        if ax is axes[0][0]:  # one legend: the other panel's points are the same arms
            ax.legend(fontsize=8)
    fig.suptitle("Report seeds 3-7: each arm minus no regularizer, paired, 95 % interval",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def weights_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per setting: the weight alpha of every auto run against the fraction of
    training done, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    auto = [r for r in rows if r.get("alpha_steps")]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in auto)]
    if not settings:
        raise ValueError("no auto run with its weight over training in this raw file")
    columns = min(3, len(settings))
    rows_n = -(-len(settings) // columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(3.6 * columns, 2.6 * rows_n),
                             sharey=True, squeeze=False)
    arms = sorted({r["arm"] for r in auto})
    seeds = sorted({r["seed"] for r in auto})
    colors = dict(zip(seeds, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, setting in zip(axes.flat, settings):
        for r in sorted((r for r in auto if r["setting"] == setting),
                        key=lambda r: (r["arm"], r["seed"])):
            steps = r["alpha_steps"]
            ax.plot([i / max(1, len(steps) - 1) for i in range(len(steps))], steps, lw=1,
                    color=colors.get(r["seed"]), ls=("-", "--", ":")[arms.index(r["arm"]) % 3],
                    label=f"{r['arm']}, seed {r['seed']}")
        ax.set_title(setting, fontsize=9)
        ax.set_ylim(0, 0.55)
        ax.set_xlabel("fraction of training", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("alpha", fontsize=8)
    for ax in list(axes.flat)[len(settings):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("alpha=\"auto\": the weight over training, one line per seed "
                 f"({', '.join(f'{a}: {ls}' for a, ls in zip(arms, ('solid', 'dashed', 'dotted')))})",
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
        arms = sorted({r["arm"] for r in mrows}, key=lambda a: (a != "none", a in _ours([a]),
                                                              a.split()[0], _alpha(a), a))

        def values(setting: str, arm: str) -> dict[int, float]:
            return by_seed(mrows, lambda r: r["value"], setting=setting, arm=arm)

        digits = 3 if lower_better else 2
        out += [f"Final {metric}, mean ± std over seeds"
                + (" (lower is better):" if lower_better else ":"), "",
                "| setting | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        out += [f"| {s} | " + " | ".join(cell(list(values(s, a).values()), digits) for a in arms)
                + " |" for s in settings]
        ours = _ours(arms)
        out += ["", PAIRED_NOTE, "", "| setting | " + " | ".join(f"{a} - none" for a in arms[1:])
                + "".join(f" | {a} - best fixed {_variant(a)}" for a in ours) + " |",
                "|---" * (len(arms) + len(ours)) + "|"]
        for s in settings:
            base = values(s, "none")
            cells = [paired_text(values(s, a), base, 2 if lower_better else 1) if base else "-"
                     for a in arms[1:]]
            for a in ours:
                best = _best_fixed(mrows, s, lower_better, _variant(a))
                cells.append(f"{paired_text(values(s, a), values(s, best), 2 if lower_better else 1)}"
                             f" (best: {best})" if best and values(s, a) else "-")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
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
    parser.add_argument("--seeds", type=int, nargs="+", default=list(REPORT_SEEDS),
                        help="with --collect: the seeds to keep (a design file: 0)")
    parser.add_argument("--rule", default=AUTO,
                        help="with --collect: the auto arm's name (a design rule's runs: "
                             "auto-share, auto-sign)")
    mode.add_argument("--tables", type=Path, metavar="RAW", help="print a raw file's tables")
    parser.add_argument("--figure", type=Path, help="with --tables: also draw the paired "
                                                    "differences here (a .png)")
    parser.add_argument("--weights", type=Path, help="with --tables: also draw the auto runs' "
                                                     "weight over training here (a .png)")
    args = parser.parse_args(argv)
    if args.collect:
        if args.out is None:
            parser.error("--collect needs --out")
        if args.figure or args.weights:
            parser.error("--figure and --weights go with --tables")
        if not args.out.parent.is_dir():
            parser.error(f"--out: no folder {args.out.parent}")
        missing = [p for p in [*args.collect, *args.reuse] if not p.exists()]
        if missing:
            parser.error(f"not found: {', '.join(map(str, missing))}")
        if not args.form.startswith(SCALE_INVARIANT) or " " in args.form:
            parser.error(f"--form must start with {SCALE_INVARIANT!r} and hold no space, "
                         f"got {args.form!r}")
        if not args.rule.startswith(AUTO) or " " in args.rule:
            parser.error(f"--rule must start with {AUTO!r} and hold no space, got {args.rule!r}")
        if any(s < 0 for s in args.seeds):
            parser.error(f"--seeds must be >= 0, got {args.seeds}")
        try:
            rows = collect(args.collect, args.reuse, args.form, tuple(args.seeds), args.rule)
        except ValueError as err:  # nothing is written
            parser.error(str(err))
        write_jsonl(args.out, rows)
        print(tables(rows))
    else:
        if args.out or args.reuse or args.form != SCALE_INVARIANT or args.rule != AUTO \
                or args.seeds != list(REPORT_SEEDS):
            parser.error("--out, --reuse, --form, --seeds and --rule go with --collect")
        for name, path in (("--figure", args.figure), ("--weights", args.weights)):
            if path and path.suffix != ".png":
                parser.error(f"{name} must name a .png file, got {path}")
            if path and not path.parent.is_dir():
                parser.error(f"{name}: no folder {path.parent}")
        if not args.tables.is_file():
            parser.error(f"--tables: no file {args.tables}")
        try:
            rows = read_jsonl(args.tables)
        except json.JSONDecodeError as err:
            parser.error(f"--tables: {args.tables} is not a JSON-lines file ({err})")
        if not rows or any({"setting", "arm", "seed", "metric", "value"} - set(r) for r in rows):
            parser.error(f"--tables: {args.tables} is not a raw file of this report (rows need "
                         "setting, arm, seed, metric, value)")
        if args.weights and not any(r.get("alpha_steps") for r in rows):
            parser.error(f"--weights: {args.tables} holds no auto run's weight over training")
        print(tables(rows))
        if args.figure:
            figure(rows, args.figure)
        if args.weights:
            weights_figure(rows, args.weights)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
