"""Paired differences of an alpha x K sweep (``sigreg sweep``'s ``sweep.json``), read from its
raw file: at every alpha each K against ``--k``, and at every K each alpha against ``--alpha``,
paired over seeds (every cell of a sweep trains the same seeds) with their 95 % interval.

Several files are merged cell by cell (a cell, alpha and K, in two files is an error); a
difference between cells of different files pairs runs of the same seed made by different
sweeps, possibly on different devices: say so where it is quoted.

    PYTHONPATH=src python3 experiments/sweep_tables.py experiments/sweep-weak-cpu.json --k 64 \\
        --alpha 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _tables import PAIRED_NOTE, paired_table

Cells = dict[tuple[float, int], dict[int, float]]  # (alpha, K) -> {seed: final test acc %}


def load(paths: list[Path]) -> Cells:
    cells: Cells = {}
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            key = (run["alpha"], run["sketch_dim"])
            if key in cells and run["seed"] in cells[key]:
                raise ValueError(f"alpha {key[0]:g}, K {key[1]}, seed {run['seed']} is in more "
                                 f"than one file ({path})")
            cells.setdefault(key, {})[run["seed"]] = 100 * run["final_test_acc"]
    return cells


def markdown(cells: Cells, k: int, alpha: float) -> str:
    # Column label -> value, since a table's columns are labelled strings.
    alphas = {f"alpha {a:g}": a for a in sorted({a for a, _ in cells})}
    dims = {f"K {d}": d for d in sorted({d for _, d in cells})}
    # Rows only where the baseline cell and another exist: elsewhere every cell would be "-".
    rows_k = [a for a in alphas.values()
              if (a, k) in cells and any((a, d) in cells for d in dims.values() if d != k)]
    rows_alpha = [d for d in dims.values()
                  if (alpha, d) in cells and any((a, d) in cells for a in alphas.values()
                                                 if a != alpha)]
    by_k = paired_table("alpha", rows_k, list(dims), f"K {k}",
                        lambda a, col: cells.get((a, dims[col]), {}), lambda a: f"{a:g}")
    by_alpha = paired_table("K", rows_alpha, list(alphas), f"alpha {alpha:g}",
                            lambda d, col: cells.get((alphas[col], d), {}))
    return (f"At every alpha, each K against K {k} (points):\n\n{by_k}\n"
            f"At every K, each alpha against alpha {alpha:g} (points):\n\n{by_alpha}\n"
            f"{PAIRED_NOTE}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", type=Path, nargs="+", help="sweep.json files")
    parser.add_argument("--k", type=int, default=64, help="the K compared against (default 64)")
    parser.add_argument("--alpha", type=float, default=0.1,
                        help="the alpha compared against (default 0.1)")
    args = parser.parse_args(argv)
    try:
        print(markdown(load(args.sweeps), args.k, args.alpha))
    except ValueError as exc:
        print(f"sweep_tables: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
