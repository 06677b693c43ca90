"""What the study scripts share: mean ± sample std of a cell, seed-paired differences with
their confidence interval, results files and the runs' provenance."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float], digits: int = 2, count: bool = True) -> str:
    """``mean ± std (n=k)`` for a table cell, ``-`` when there is nothing; one value has no
    ``± std`` (a single seed says nothing about the spread)."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    spread = f" ± {std:.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{spread}" + (f" (n={len(values)})" if count else "")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rewrite ``path`` with one JSON line per row (rewritten after every run: resumable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def grid_table(corner: str, rows: Sequence[Any], columns: Sequence[str],
               cell_of: Callable[[Any, str], str], row_label: Callable[[Any], str] = str,
               header: Callable[[str], str] = str) -> str:
    """A markdown table: one row per ``rows`` entry, one column per ``columns`` entry (titled
    ``header(column)``), each cell ``cell_of(row, column)``."""
    lines = [f"| {corner} | " + " | ".join(map(header, columns)) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| {row_label(row)} | " + " | ".join(cell_of(row, c) for c in columns) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ seed-paired differences
# Two arms trained on the same seeds share each seed's initialisation and data order, so
# their per-seed difference removes that seed's luck; with 2-5 seeds the interval is wide,
# and the table says so instead of a bare difference of means.

# Student's t, two-sided 95 % (the 0.975 quantile), df 1-30, to 9 decimals: bisection on the
# t density integrated numerically (no scipy here); the standard tables' values, and
# tests/test_tables.py repeats the check for every entry.
T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851,
        2.364624252, 2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830,
        2.160368656, 2.144786688, 2.131449546, 2.119905299, 2.109815578, 2.100922040,
        2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
        2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)
Z975 = 1.959963985  # the normal's, the limit as df grows


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom.

    Beyond the table, the Cornish-Fisher expansion of Abramowitz & Stegun 26.7.5 in 1/df
    (off by under 1e-7 from df 30 on), not the normal value, which would be 0.08 short at 31.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96,
             (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
             (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(g / df**i for i, g in enumerate(terms, 1))


@dataclass(frozen=True)
class Paired:
    """``arm - baseline`` over the seeds both were measured on: the mean difference, its
    95 % confidence interval (``None`` for one seed: no spread to estimate), the number of
    seeds and of those where the difference is positive."""

    mean: float
    low: float | None
    high: float | None
    n: int
    positive: int


def paired(arm: Mapping[Any, float], baseline: Mapping[Any, float]) -> Paired:
    """Seed-paired difference ``arm[s] - baseline[s]``, with a Student t interval (n - 1
    degrees of freedom). ``arm`` and ``baseline`` map seed -> value and must hold the same
    seeds: a difference across different seeds is not paired."""
    if set(arm) != set(baseline):
        raise ValueError(f"unpaired seeds: arm has {sorted(arm)}, baseline {sorted(baseline)}")
    if not arm:
        raise ValueError("no seeds to compare")
    diffs = [arm[s] - baseline[s] for s in sorted(arm)]
    mean, positive = statistics.fmean(diffs), sum(d > 0 for d in diffs)
    if len(diffs) == 1:
        return Paired(mean, None, None, 1, positive)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(mean, mean - half, mean + half, len(diffs), positive)


def paired_cell(p: Paired, digits: int = 1) -> str:
    """``+11.6 [+4.1, +19.0] (5/5)``: mean difference, 95 % CI, seeds positive / seeds."""
    sign = lambda x: f"{x:+.{digits}f}"
    interval = ("[no interval: 1 seed]" if p.low is None or p.high is None
                else f"[{sign(p.low)}, {sign(p.high)}]")
    return f"{sign(p.mean)} {interval} ({p.positive}/{p.n})"


def paired_text(arm: Mapping[Any, float], baseline: Mapping[Any, float],
                digits: int = 1) -> str:
    """A table cell for ``arm - baseline`` on the seeds both have (``-`` if none): a study
    cut short compares what it has, and the (k/n) shows how many seeds that is."""
    seeds = set(arm) & set(baseline)
    if not seeds:
        return "-"
    return paired_cell(paired({s: arm[s] for s in seeds}, {s: baseline[s] for s in seeds}),
                       digits)


def paired_table(corner: str, rows: Sequence[Any], arms: Sequence[str], baseline: str,
                 values: Callable[[Any, str], Mapping[Any, float]],
                 row_label: Callable[[Any], str] = str, digits: int = 1) -> str:
    """A markdown table of ``arm - baseline`` for every arm but the baseline, paired over
    seeds, one row per ``rows`` entry; ``values(row, arm)`` is ``{seed: value}``."""
    return grid_table(corner, rows, [a for a in arms if a != baseline],
                      lambda row, arm: paired_text(values(row, arm), values(row, baseline),
                                                   digits),
                      row_label, header=lambda arm: f"{arm} - {baseline}")


PAIRED_NOTE = ("Paired differences: mean over seeds of (arm - baseline) on the same seed, "
               "[95 % confidence interval, Student t with n - 1 degrees of freedom], "
               "(seeds where the difference is positive / seeds).")


def by_seed(rows: Iterable[dict[str, Any]], value: Callable[[dict[str, Any]], float | None],
            **match: Any) -> dict[Any, float]:
    """``{seed: value(row)}`` of the rows whose keys equal ``match``; rows whose value is
    ``None`` (a diverged or missing run) are left out."""
    out = {}
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and (x := value(row)) is not None:
            out[row["seed"]] = x
    return out


# ------------------------------------------------------------------ raw files and provenance
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file (a study's raw file, or its ``<out>/results.jsonl``)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_provenance(run_dir: Path) -> list[dict[str, Any]]:
    """The run's provenance, one record per start (``provenance.json``, written when a run
    starts, so a diverged run has it too); ``[]`` for a run from before it existed."""
    path = run_dir / "provenance.json"
    return json.loads(path.read_text()) if path.exists() else []
