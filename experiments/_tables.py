"""What the study scripts share: mean ± sample std of a cell, and results files."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float], digits: int = 2, count: bool = True) -> str:
    """``mean ± std (n=k)`` for a table cell, ``-`` when there is nothing."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" + (f" (n={len(values)})" if count else "")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rewrite ``path`` with one JSON line per row (rewritten after every run: resumable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def grid_table(corner: str, rows: Sequence[Any], columns: Sequence[str],
               cell_of: Callable[[Any, str], str], row_label: Callable[[Any], str] = str) -> str:
    """A markdown table: one row per ``rows`` entry, one column per ``columns`` entry, each
    cell ``cell_of(row, column)``."""
    lines = [f"| {corner} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row_label(row)} | " + " | ".join(cell_of(row, c) for c in columns) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"
