"""Issue 22's report phase for ``weak_sigreg(scale_invariant=True)`` (docs/studies.md, section 14).

The runs are the studies' own: ``experiments/vit_stability.py`` with ``--arms none`` and with
``--arms weak --set scale_invariant=true`` into two folders, on the report seeds 3-7 (the
variant was chosen on seed 0). This script merges their ``results.jsonl`` into one raw file,
each row's arm named for what it ran, and prints the tables from such a file:

    PYTHONPATH=src python experiments/scale_invariant.py --merge none=runs/si-report/vit-none \\
        weak-scale-invariant=runs/si-report/vit-si --out experiments/scale-invariant-report-cpu.jsonl
    PYTHONPATH=src python experiments/scale_invariant.py --tables \\
        experiments/scale-invariant-report-cpu.jsonl

Tables: final test accuracy (%) per setting and arm, mean ± std over seeds; each arm minus
the baseline, paired over seeds, with its 95 % interval (Student t).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _tables import PAIRED_NOTE, by_seed, cell, paired_text, read_jsonl, write_jsonl


def merge(sources: list[str], out: Path) -> None:
    """``ARM=FOLDER`` items: the rows of each folder's results.jsonl as that arm. A run's
    config.json, where it has one, must agree with the label (scale_invariant)."""
    rows = []
    for item in sources:
        arm, _, folder = item.partition("=")
        if arm not in ("none", "weak", "weak-scale-invariant") or not folder:
            raise SystemExit(f"--merge takes ARM=FOLDER with ARM none, weak or "
                             f"weak-scale-invariant, got {item!r}")
        for row in read_jsonl(Path(folder) / "results.jsonl"):
            config = Path(folder) / f"lr{row['lr']:g}-{row['arm']}-s{row['seed']}" / "config.json"
            if config.exists():
                ran = json.loads(config.read_text()).get("scale_invariant", False)
                if ran != (arm == "weak-scale-invariant"):
                    raise SystemExit(f"{config}: scale_invariant={ran}, labelled {arm}")
            rows.append({**row, "arm": arm, "setting": f"vit5k-lr{row['lr']:g}"})
    write_jsonl(out, rows)


def tables(path: Path) -> str:
    rows = [r for r in read_jsonl(path) if r.get("state") == "finished"]
    settings = sorted({r["setting"] for r in rows})
    arms = [a for a in ("none", "weak", "weak-scale-invariant") if any(r["arm"] == a for r in rows)]

    def acc(row: dict) -> float:
        return 100 * row["final_test_acc"]

    lines = ["| setting | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in settings:
        cells = [cell([acc(r) for r in rows if r["setting"] == s and r["arm"] == a]) for a in arms]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", PAIRED_NOTE, "", "| setting | " + " | ".join(f"{a} - none" for a in arms[1:]) + " |",
              "|---" * len(arms) + "|"]
    for s in settings:
        base = by_seed((r for r in rows if r["setting"] == s and r["arm"] == "none"), acc)
        cells = [paired_text(by_seed((r for r in rows if r["setting"] == s and r["arm"] == a), acc),
                             base) for a in arms[1:]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merge", nargs="+", metavar="ARM=FOLDER",
                        help="vit_stability.py output folders, each with the arm it ran")
    parser.add_argument("--out", type=Path, help="the merged raw file (with --merge)")
    parser.add_argument("--tables", type=Path, help="a merged raw file: print its tables")
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        merge(args.merge, args.out)
        print(tables(args.out))
    elif args.tables:
        print(tables(args.tables))
    else:
        parser.error("give --merge ARM=FOLDER ... --out FILE, or --tables FILE")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
