"""Small timing and statistics helpers shared by the benchmark scripts (stdlib + torch only)."""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch


def command_line() -> str:
    """The command that started this script, ready to paste (python path relative if we can)."""
    python = sys.executable
    if python.startswith(os.getcwd() + os.sep):
        python = os.path.relpath(python)
    return shlex.join([python, *sys.argv])


def environment(device: torch.device) -> dict[str, object]:
    """What a result was measured on: torch version, device name, threads, platform."""
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "platform": f"{platform.machine()} {os.cpu_count()} cpus, python "
        f"{platform.python_version()}",
    }


def write_json(path: str | None, result: dict) -> None:
    """Write ``result`` to ``path`` as JSON (nothing when no path was asked for)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[..., object], device: torch.device, *args: object) -> float:
    """Seconds taken by ``fn(*args)``, synchronising the device before and after."""
    sync(device)
    start = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - start


def interleaved(arms: Sequence[str], rounds: int, warmup: int, seed: int,
                time_one: Callable[[str], float]) -> dict[str, list[float]]:
    """Each arm's ``time_one(arm)`` once per round, the arms in a new random order each round
    (so drift and load on the machine hit all arms alike); the first ``warmup`` rounds are
    not kept."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(warmup + rounds):
        order = list(arms)
        rng.shuffle(order)
        for arm in order:
            t = time_one(arm)
            if r >= warmup:
                times[arm].append(t)
    return times


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile, q in [0, 1]."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the median of ``values``."""
    rng = random.Random(seed)
    n = len(values)
    meds = [statistics.median(rng.choices(values, k=n)) for _ in range(n_boot)]
    tail = (1 - level) / 2
    return quantile(meds, tail), quantile(meds, 1 - tail)


def add_size_arguments(parser, sizes: dict[str, tuple[object, object]]) -> None:
    """``--<name>`` for every ``sizes[name] = (full, quick)``, None unless given (see
    :func:`fill_sizes`)."""
    for name, (full, quick) in sizes.items():
        kind = str if isinstance(full, str) else int
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"default {full}, with --quick {quick}")


def fill_sizes(args, sizes: dict[str, tuple[object, object]]) -> None:
    """Every size not given on the command line: its quick value under ``--quick``, else
    its full one."""
    for name, (full, quick) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
