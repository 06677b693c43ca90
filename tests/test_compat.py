"""The integrations against the oldest supported and the newest available Lightning and
Transformers (slow: `make test-all`; the first run installs, later runs reuse the venvs).

Each case is a throwaway venv under .compat/ (gitignored, without system site-packages) that
holds torch 2.13.0, pytest and the integration's packages at the versions under test; then
``pip install -e '.[extra]'`` must change none of them (sigreg installs beside a user's
stack), and the integration's test file must pass there. "Oldest" is the lower bound that
pyproject.toml declares for each package of the extra, "newest" the index's latest release.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
requirements = pytest.importorskip("packaging.requirements", reason="needs packaging (pip's)")

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".compat"
TORCH = "2.13.0"
TEST_FILES = {"lightning": "tests/test_integration_lightning.py",
              "transformers": "tests/test_integration_transformers.py"}
pytestmark = pytest.mark.slow


def lower_bounds(extra: str) -> dict[str, str]:
    """Each package of ``extra`` -> the version its ``>=`` in pyproject.toml names."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    bounds = {}
    for text in pyproject["project"]["optional-dependencies"][extra]:
        req = requirements.Requirement(text)
        (spec,) = [s for s in req.specifier if s.operator == ">="]
        bounds[req.name] = spec.version
    return bounds


def pip(python: Path, *args: str, timeout: float = 1800) -> str:
    done = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def newest(name: str) -> str:
    """The latest release of ``name`` on the index pip is configured with."""
    out = pip(Path(sys.executable), "index", "versions", name, timeout=300)
    return re.search(rf"^{re.escape(name)} \(([^)]+)\)", out, re.MULTILINE).group(1)


def freeze(python: Path) -> dict[str, str]:
    rows = json.loads(pip(python, "list", "--format", "json"))
    return {r["name"].lower().replace("_", "-"): r["version"] for r in rows}


def compat_venv(extra: str, pins: dict[str, str]) -> tuple[Path, dict]:
    """A venv holding torch, pytest and ``pins``, then sigreg[extra] (editable) on top.

    Returns its python and what ``pip install -e .[extra]`` changed (package -> (before,
    after)); cached by everything that decides the result, so a new release is a new venv.
    """
    extras_text = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"][extra]
    key = json.dumps([extra, pins, extras_text, TORCH, sys.version_info[:2]], sort_keys=True)
    name = f"{extra}-" + "-".join(f"{p}{v}" for p, v in sorted(pins.items()))
    venv = CACHE / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    python, done = venv / "bin" / "python", venv / "compat.json"
    if done.exists():
        return python, json.loads(done.read_text())["changed"]
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    pip(python, "install", "-q", f"torch=={TORCH}", "pytest",
        *(f"{p}=={v}" for p, v in pins.items()))
    before = freeze(python)
    pip(python, "install", "-q", "-e", f"{ROOT}[{extra}]")
    after = freeze(python)
    changed = {p: (before.get(p), after.get(p)) for p in ("torch", *pins)
               if before.get(p) != after.get(p)}
    done.write_text(json.dumps({"pins": pins, "before": before, "after": after,
                                "changed": changed}, indent=1))
    return python, changed


# Run in the venv: where its packages live, torch's version, then each named package's.
VERSIONS = ("import importlib.metadata as m, sys, torch\n"
            "print(sys.prefix, torch.__version__, *(m.version(p) for p in sys.argv[1:]))")
CASES = [(extra, age) for extra in TEST_FILES for age in ("oldest", "newest")]


@pytest.mark.parametrize(("extra", "age"), CASES, ids=[f"{e}-{a}" for e, a in CASES])
def test_integration_against_oldest_and_newest(extra, age):
    bounds = lower_bounds(extra)
    pins = bounds if age == "oldest" else {p: newest(p) for p in bounds}
    python, changed = compat_venv(extra, pins)
    assert changed == {}, f"pip install -e '.[{extra}]' changed {changed}"
    versions = subprocess.run(
        [str(python), "-c", VERSIONS, *pins],
        capture_output=True, text=True, check=True).stdout.split()
    assert versions[0] == str(python.parent.parent)  # this venv's packages, not ours
    assert versions[1].startswith(TORCH) and versions[2:] == list(pins.values())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:logging", TEST_FILES[extra]],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and " passed" in summary and "skipped" not in summary, (
        f"{extra} {pins}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}")
