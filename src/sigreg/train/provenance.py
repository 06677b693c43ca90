"""What made a result: code version, library versions, machine, date.

Every run directory records it (a ``start`` row in ``metrics.jsonl`` per start, and
``summary.json``'s ``provenance``), and every study's raw results line carries it, so a
number in the docs can be traced to the code and machine that produced it.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]


@cache
def git_state(where: Path = PACKAGE_DIR) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding ``where``.

    ``None`` when sigreg was installed from a wheel (no git checkout) or git is missing.
    ``dirty`` says whether tracked files differ from the commit (untracked files ignored).
    """
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_name(device: torch.device | str) -> str:
    """``"cpu"``, or the accelerator's own name (``"NVIDIA H200"``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def provenance(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The record of what is running now: sigreg version, git commit and dirtiness, torch
    version, device, torch threads, Python, platform and the UTC date (ISO 8601)."""
    from sigreg import __version__

    return {
        "sigreg": __version__,
        **git_state(),
        "torch": str(torch.__version__),  # a TorchVersion would not load weights_only
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": f"{platform.machine()} {platform.system()}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
