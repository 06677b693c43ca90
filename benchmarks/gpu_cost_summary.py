"""The GPU cost targets from what ``benchmarks/gpu_cost.sh`` left in its OUT folder: one
markdown table of every measured ratio with its target and verdict, for benchmarks/RESULTS.md.
Parts that did not run are listed as not measured.

    python benchmarks/gpu_cost_summary.py OUT
    python benchmarks/gpu_cost_summary.py --collect RUN_DIR --arm weak --compile false
        # one JSON line: epoch 2 of a training run (what the script appends to epochs.jsonl)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FULL_EPOCH = 50_000  # CIFAR-100's training images
# (file, arm) -> target of the ratio arm / none.
STEP_TARGETS = {("cost", "weak"): 1.5, ("overhead_amp", "weak"): 1.05,
                ("overhead_amp", "strong"): 1.08}
EPOCH_TARGETS = {"weak": 1.05, "strong": 1.08}
COMPILED_EPOCH_S = 5.0


def collect(run: Path, arm: str, compile: str, tag: str) -> dict:
    """Epoch 2's time and throughput of one training run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in rows if r.get("kind") == "epoch"][-1]
    images = round(epoch["images_per_s"] * epoch["epoch_time"])
    return {"tag": tag, "arm": arm, "compile": compile == "true", "epoch": epoch["epoch"],
            "images": images, "epoch_time": epoch["epoch_time"],
            "images_per_s": epoch["images_per_s"],
            "full_epoch_s": FULL_EPOCH / epoch["images_per_s"]}


def _verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "not met"


def _step_rows(out: Path, tag: str) -> list[str]:
    rows = []
    for name in ("cost", "overhead_amp", "cost_compiled"):
        path = out / f"{tag}{name}.json"
        if not path.exists():
            rows.append(f"| {tag}{name} | - | not measured (part did not run or ended early) | - |")
            continue
        res = json.loads(path.read_text())
        step = res.get("step_time", res)  # overhead.py nests it
        none_ms = step["arms"]["none"]["median_ms"]
        for arm, r in step["ratios"].items():
            target = STEP_TARGETS.get((name, arm))
            verdict = f"<= {target}: {_verdict(r['median'], target)}" if target else "-"
            rows.append(f"| {tag}{name} | {arm} | {r['median']:.3f}x ({r['ci95_low']:.3f}-"
                        f"{r['ci95_high']:.3f}); none {none_ms:.2f} ms/step | {verdict} |")
        if name == "overhead_amp":
            weak, strong = step["arms"]["weak"]["median_ms"], step["arms"]["strong"]["median_ms"]
            rows.append(f"| {tag}{name} | weak vs strong | {weak:.2f} vs {strong:.2f} ms/step | "
                        f"weak no slower: {'PASS' if weak <= strong else 'not met'} |")
    return rows


def _epoch_rows(out: Path) -> list[str]:
    path = out / "epochs.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if not runs:
        return ["| epochs | - | not measured (part did not run or ended early) | - |"]
    rows = []
    for run in runs:
        same = [r for r in runs if (r["tag"], r["compile"]) == (run["tag"], run["compile"])]
        none = next((r for r in same if r["arm"] == "none"), None)
        label = f"{run['tag']}{'compiled' if run['compile'] else 'eager'}"
        value = (f"{run['full_epoch_s']:.2f} s per 50k-image epoch ({run['images_per_s']:.0f} "
                 f"img/s over {run['images']} images)")
        verdicts = []
        if none is not None and run["arm"] != "none":
            ratio = none["images_per_s"] / run["images_per_s"]
            value += f"; {ratio:.3f}x none"
            verdicts.append(f"<= {EPOCH_TARGETS[run['arm']]}: "
                            f"{_verdict(ratio, EPOCH_TARGETS[run['arm']])}")
        if run["compile"]:
            verdicts.append(f"<= {COMPILED_EPOCH_S} s: "
                            f"{_verdict(run['full_epoch_s'], COMPILED_EPOCH_S)}")
        rows.append(f"| {label} epoch | {run['arm']} | {value} | {'; '.join(verdicts) or '-'} |")
    return rows


def summary(out: Path) -> str:
    tags = [""] + (["before_"] if any(out.glob("before_*")) else [])
    env = next((json.loads(p.read_text()).get("env") for p in sorted(out.glob("*.json"))), None)
    lines = [f"GPU cost targets ({env.get('device', '?')}, torch {env.get('torch', '?')})"
             if env else "GPU cost targets", "",
             "| measurement | arm | value | target |", "|---|---|---|---|"]
    for tag in tags:
        lines += _step_rows(out, tag)
    lines += _epoch_rows(out)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", type=Path, help="the script's OUT folder")
    p.add_argument("--collect", type=Path, metavar="RUN_DIR")
    p.add_argument("--arm", choices=("none", "weak", "strong"))
    p.add_argument("--compile", choices=("true", "false"), default="false")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.collect:
        if not args.arm:
            p.error("--collect needs --arm")
        print(json.dumps(collect(args.collect, args.arm, args.compile, args.tag)))
    elif args.out:
        sys.stdout.write(summary(args.out))
    else:
        p.error("give OUT, or --collect RUN_DIR --arm ARM")


if __name__ == "__main__":
    main()
