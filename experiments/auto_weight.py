"""Issue 22: does ``alpha="auto"`` (sigreg.auto) match the best fixed alpha without tuning?

Settings (each with its own failure of a fixed alpha):

- ``mlp-d<depth>-<init>``: the deep Fashion-MNIST MLPs (``fmnist-mlp-d<depth>-<variant>``
  presets: width 256, plain SGD lr 0.1, clip 1, 5 epochs), depths 10 and 20, PyTorch's
  default init and He init (``model.init``).
- ``vit5k-lr<lr>``: the 5000-image ViT (``fmnist-vit-5k-<variant>``: AdamW, cosine, 8
  epochs) at lr 1e-3, 1e-2 and 3e-2 (at 3e-2 weak alpha 0.1 sits at chance where the
  baseline learns).
- ``lm-lr<lr>``: the byte-level language model of ``experiments/char_lm.py`` (600 AdamW
  steps, ``pool="flatten"``; needs Debian's ``fortunes``) at lr 1e-3 and 3e-2.

Arms: ``none`` (the baseline), ``<variant>-a<alpha>`` for the fixed grids below, and
``<variant>-auto``, for weak and strong. The alpha convention is ``(1 - alpha) * task +
alpha * reg``, so the grid stops at 0.5 (alpha 1 would drop the task). Seeds: ``--phase
design`` is seeds 0-2 on the design settings (``mlp-d10-default``, ``vit5k-lr0.03``), where
the rule's constants were chosen; ``--phase report`` (the default) is seeds 3-7 on every
setting, where it is judged. Each run trains into ``<out>/<setting>/<arm>-s<seed>/``.

    # 1. one line per run (its directory, then the command), for xargs:
    PYTHONPATH=src python3 experiments/auto_weight.py --out runs/auto-weight --commands | \\
        OMP_NUM_THREADS=1 PYTHONPATH=src xargs -P 2 -L 1 sh -c \\
        'mkdir -p "$0" && "$@" >> "$0/train.log" 2>&1'
    # 2. gather: results.jsonl (raw rows with provenance), auto_weight.md, auto_weight.png
    PYTHONPATH=src python3 experiments/auto_weight.py --out runs/auto-weight --collect
    # the tables (and figure) of a results file alone:
    PYTHONPATH=src python3 experiments/auto_weight.py --tables runs/auto-weight/results.jsonl \\
        --figure /tmp/auto_weight.png

Design phase so far (seed 0 only, CPU, to check the rule, not to claim anything): the
share held by the rule, measured at a held fixed alpha at the last regularized layer, was
~0 for the first 40 % of training of ``mlp-d10-default`` (features near zero: so is the
regularizer's gradient) and 0.09 / 0.13 after, under weak alpha 0.1 / 0.3 (68.9 / 71.2 %);
on ``vit5k-lr0.03`` (2 epochs) under weak alpha 0.1 it was 0.0, 0.4, 4.5, 16 over the first
steps, then 12-110 (at chance). First design (share 0.25, w set to the rule's value at
once): ``mlp-d10-default`` weak sat at the bound alpha 0.5 throughout (68.2 %);
``vit5k-lr0.03`` weak took alpha 0.5 for one step (the first measurement, at
initialisation), then 0.01-0.03, and stayed at chance. Second design (share 0.125, start at
alpha 0.01, up by at most x1.05 per step, down at once), ``--set alpha=auto seed=0
device=cpu`` (the ViT: ``lr=0.03 epochs=2``): ``mlp-d10-default`` weak 70.87 % (alpha 0.5
while the features are dead, epochs 1-2, then 0.21-0.26; fixed 0.3: 71.17, 0.1: 68.87);
``vit5k-lr0.03`` weak 11.35 % (alpha 0.010-0.011 for three steps, then 0.003-0.0025; at
chance after epoch 1, train accuracy 10 %), where the baseline with the same 2-epoch
schedule reaches 16.7 / 23.7 % (epochs 1 / 2): holding the share at the last regularized
layer does not avoid the collapse there. Fixed weak alpha 0.001 (below anything auto chose)
is at chance too (10.0 %). The monitor says why: the baseline's residual stream grows to a
per-feature variance of ~4e4 by step 25 and ~1.4e5 by step 50 with its samples spread (mean
cosine at ``blocks.5`` 0.19-0.26 after step 25), while weak SIGReg at alpha 0.001-0.01 holds
that variance at 0.5-6 and the samples point one way (mean cosine 0.999-1.0 from step 25).
Its pull toward unit covariance points the same way at every step; the task's gradient,
larger per step, does not, and under AdamW's momentum the consistent pull wins. A per-step
norm share does not see that.

Third round (seed 0, 8 epochs, ``experiments/auto-weight-design3-cpu.jsonl``, with each
run's code and command; design only): at lr 3e-2 the baseline ends at 25.3 % with the last
block's effective dimension at 1.03-1.05 (rank-one features, per-feature variance 2.6e5-3.5e5):
the paper's dimensional collapse, which section 7b's short runs had not shown. A fixed weak
alpha of 1e-6 does not collapse the run and more than doubles that: 47.6 % (effective
dimension 3.4-3.6, variance 2e3-4e3). So the best fixed weak alpha at 3e-2 lies at or below
1e-6 (1e-3 and up: chance), five orders of magnitude below lr 1e-3's 0.1 (66.3 %). Weighed in
loss terms (alpha * reg / task), 1e-6 is ~0.03 there (reg ~6e4), lr 1e-3's 0.1 is ~0.4 and the
MLP's 0.3 is ~1-3. A loss-ratio rule (w = c * task / reg each step: the weights of
uncertainty weighting, Kendall et al. 2018, at their optimum; an uncommitted probe patch, see
the raw rows' ``code``) shows it: c = 0.4 sends lr 3e-2 to chance (alpha 0.04-0.11, features
at variance 0.15 all pointing one way, mean cosine 1.0); c = 0.03 keeps it alive (43.4 %;
alpha ~1e-6, at the probe's lower clamp, from epoch 2) but gives up most of lr 1e-3's gain
(59.9 % against 66.3 at alpha 0.1, baseline 57.3). Neither the gradient share nor the loss
share at the best fixed weights is one number across these settings; what separates them is
the features' scale (per-feature variance ~1e-3-1 where alpha 0.1-0.3 is best, 1e3-1e5 where
1e-6 is). Next candidate, not yet tried: a weight that falls with that scale above unit
variance (the regularizer's pull on a huge residual stream is what collapses it), rising as
the gradient-share rule does below it.

Tables: final test accuracy (%; the LM: validation bits per byte, lower is better) per
setting and arm, mean ± std; every arm minus the baseline, paired over seeds with its 95 %
interval; ``auto`` minus each fixed alpha of its variant, paired. Figure: the weight alpha
of the auto runs against training progress, one panel per setting.
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
    paired_table,
    paired_text,
    read_jsonl,
    run_provenance,
    write_jsonl,
)

from sigreg.train.config import apply_overrides
from sigreg.train.presets import preset_config

VARIANTS = ("weak", "strong")
GRIDS = {"weak": (0.03, 0.1, 0.3, 0.5), "strong": (0.01, 0.03, 0.1, 0.3)}
MLP = {f"mlp-d{d}-{init}": (d, init) for d in (10, 20) for init in ("default", "he")}
VIT = {f"vit5k-lr{lr:g}": lr for lr in (1e-3, 1e-2, 3e-2)}
LM = {f"lm-lr{lr:g}": lr for lr in (1e-3, 3e-2)}
SETTINGS = (*MLP, *VIT, *LM)
DESIGN = ("mlp-d10-default", "vit5k-lr0.03")
SEEDS = {"design": (0, 1, 2), "report": (3, 4, 5, 6, 7)}
PYTHON = "python3"


def arms(variants: tuple[str, ...] = VARIANTS) -> list[str]:
    return ["none", *(f"{v}-a{a:g}" for v in variants for a in GRIDS[v]),
            *(f"{v}-auto" for v in variants)]


def parse_arm(arm: str) -> tuple[str, float | str | None]:
    """``"weak-a0.3"`` -> ("weak", 0.3), ``"strong-auto"`` -> ("strong", "auto"),
    ``"none"`` -> ("none", None)."""
    if arm == "none":
        return "none", None
    variant, weight = arm.split("-", 1)
    return variant, "auto" if weight == "auto" else float(weight[1:])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/auto-weight"))
    p.add_argument("--phase", choices=tuple(SEEDS), default="report")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=None,
                   help="default: every setting (report), the design ones (design)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="default: 0-2 (design), 3-7 (report)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="settings for every `sigreg train` run, e.g. epochs=1")
    p.add_argument("--lm-args", default="", help="extra char_lm.py arguments, e.g. '--steps 20'")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--commands", action="store_true",
                      help="print one line per run (its directory, then the command)")
    mode.add_argument("--collect", action="store_true", help="gather finished runs")
    mode.add_argument("--tables", type=Path, metavar="RESULTS",
                      help="print the tables of a results file; nothing is gathered")
    p.add_argument("--figure", type=Path, help="with --tables: also draw the figure here")
    args = p.parse_args(argv)
    if args.settings is None:
        args.settings = list(DESIGN if args.phase == "design" else SETTINGS)
    if args.seeds is None:
        args.seeds = list(SEEDS[args.phase])
    args.variants = tuple(args.variants)
    return args


def grid(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    # Seed-major: a pool stopped early still covers every cell once.
    return [(setting, arm, seed) for seed in args.seeds for setting in args.settings
            for arm in arms(args.variants)]


def run_dir(out: Path, setting: str, arm: str, seed: int) -> Path:
    return out / setting / f"{arm}-s{seed}"


def command(setting: str, arm: str, seed: int, args: argparse.Namespace) -> str:
    """``<run dir> <command>``; `sigreg train` settings are checked here, before any run."""
    out = run_dir(args.out, setting, arm, seed)
    variant, alpha = parse_arm(arm)
    if setting in LM:
        weight = [] if alpha is None else ["--alpha", str(alpha)]
        return shlex.join([str(out), PYTHON, "experiments/char_lm.py", "--out", str(out),
                           "--arms", variant, "--lrs", f"{LM[setting]:g}", "--seeds", "1",
                           "--first-seed", str(seed), *weight, *shlex.split(args.lm_args)])
    if setting in MLP:
        depth, init = MLP[setting]
        preset, extra = f"fmnist-mlp-d{depth}-{variant}", [f"model.init={init}"]
    else:
        preset, extra = f"fmnist-vit-5k-{variant}", [f"lr={VIT[setting]:g}"]
    settings = [*args.set, *extra, *([] if alpha is None else [f"alpha={alpha}"]),
                f"seed={seed}"]
    apply_overrides(preset_config(preset), settings)
    return shlex.join([str(out), PYTHON, "-m", "sigreg.train.cli", "train", "--preset", preset,
                       "--out", str(out), "--resume", "auto", "--no-progress", "--set",
                       *settings])


def outcome(path: Path, setting: str) -> dict[str, Any]:
    """A finished run's score (test accuracy %, or validation bits for the LM), the
    weight's trajectory (auto runs) and provenance; else its state."""
    if setting in LM:
        rows = read_jsonl(path / "results.jsonl") if (path / "results.jsonl").exists() else []
        if not rows:
            return {"state": "missing", "score": None, "provenance": []}
        r = rows[-1]
        return {"state": "diverged" if r["diverged_at"] else "finished",
                "score": r["final_val_bits"], "curve": [b for _, b in r["val_curve"]],
                "alpha_steps": r.get("alpha_steps", []), "seconds": r["seconds"],
                "provenance": r["provenance"]}
    where = {"provenance": run_provenance(path)}
    if not (path / "summary.json").exists():
        log = path / "train.log"
        diverged = log.exists() and "non-finite" in log.read_text()
        return {"state": "diverged" if diverged else "missing", "score": None, **where}
    summary = json.loads((path / "summary.json").read_text())
    epochs = [r for r in read_jsonl(path / "metrics.jsonl") if r.get("kind") == "epoch"]
    return {"state": "finished", "score": 100 * summary["final_test_acc"],
            "curve": [100 * r["test_acc"] for r in epochs],
            "alpha_epochs": [r["alpha"] for r in epochs if "alpha" in r],
            "alpha_steps": [a for r in epochs for a in r.get("alpha_steps", [])],
            "seconds": summary["train_time"], **where}


def scores(results: list[dict[str, Any]], setting: str, arm: str) -> dict[int, float]:
    """``{seed: score}`` of a cell (diverged and missing runs left out)."""
    return by_seed(results, lambda r: r["score"], setting=setting, arm=arm)


def markdown(results: list[dict[str, Any]], settings: list[str],
             variants: tuple[str, ...]) -> str:
    columns = arms(variants)
    present = [s for s in settings if any(r["setting"] == s for r in results)]

    def mean_cell(setting: str, arm: str) -> str:
        rows = [r for r in results if r["setting"] == setting and r["arm"] == arm]
        diverged = sum(r["state"] == "diverged" for r in rows)
        return cell(list(scores(results, setting, arm).values()), count=False) + (
            f", {diverged} diverged" if diverged else "")

    means = grid_table("setting", present, columns, mean_cell)
    against_baseline = paired_table("setting", present, columns, "none",
                                    lambda s, arm: scores(results, s, arm))
    text = ("Final score per setting and arm, mean ± std over seeds (test accuracy %; lm-*: "
            f"validation bits per byte, lower is better):\n\n{means}\n"
            f"Each arm minus the baseline, paired over seeds:\n\n{against_baseline}\n")
    for variant in variants:
        fixed = [f"{variant}-a{a:g}" for a in GRIDS[variant]]
        table = grid_table(
            "setting", present, fixed,
            lambda s, arm, v=variant: paired_text(scores(results, s, f"{v}-auto"),
                                                   scores(results, s, arm)),
            header=lambda arm, v=variant: f"{v}-auto - {arm}")
        text += f"\n{variant}-auto minus each fixed alpha, paired over seeds:\n\n{table}"
    return text + f"\n{PAIRED_NOTE}\n"


def plot(results: list[dict[str, Any]], settings: list[str], variants: tuple[str, ...],
         path: Path) -> None:
    """alpha of every auto run against training progress (fraction of its steps), one
    panel per setting, one colour per variant; the fixed grid as dotted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [s for s in settings if any(r["setting"] == s and r.get("alpha_steps")
                                          for r in results)]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(3.4 * len(present), 3.2),
                             sharey=True, squeeze=False)
    colours = {"weak": "tab:orange", "strong": "tab:green"}
    for ax, setting in zip(axes[0], present, strict=True):
        for variant in variants:
            for r in results:
                steps = r.get("alpha_steps") or []
                if r["setting"] == setting and r["arm"] == f"{variant}-auto" and steps:
                    xs = [(i + 1) / len(steps) for i in range(len(steps))]
                    ax.plot(xs, steps, color=colours[variant], alpha=0.6, linewidth=0.8,
                            label=variant if r["seed"] == min(args_seeds(results)) else None)
            for a in GRIDS[variant]:
                ax.axhline(a, color=colours[variant], linestyle=":", linewidth=0.6)
        ax.set_yscale("log")
        ax.set_title(setting, fontsize=9)
        ax.set_xlabel("fraction of training")
    axes[0][0].set_ylabel("alpha (auto), dotted: fixed grid")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def args_seeds(results: list[dict[str, Any]]) -> list[int]:
    return sorted({r["seed"] for r in results}) or [0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.commands:
            print("\n".join(command(*cell_, args) for cell_ in grid(args)))
        elif args.tables:
            results = read_jsonl(args.tables)
            print(markdown(results, args.settings, args.variants))
            if args.figure:
                plot(results, args.settings, args.variants, args.figure)
        else:
            results = [{"setting": s, "arm": a, "seed": seed, "phase": args.phase,
                        **outcome(run_dir(args.out, s, a, seed), s)}
                       for s, a, seed in grid(args)]
            write_jsonl(args.out / "results.jsonl", results)
            table = markdown(results, args.settings, args.variants)
            (args.out / "auto_weight.md").write_text(table)
            plot(results, args.settings, args.variants, args.out / "auto_weight.png")
            print(table)
    except ValueError as exc:
        print(f"auto_weight: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
