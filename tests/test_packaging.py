"""Packaging: the metadata, a clean ``python -m build``, and the wheel installed core-only.

The fresh venv gets torch (and only its own dependencies) from this environment through a
.pth file, so the check costs seconds, not a torch download; numpy, matplotlib and tqdm are
absent there, as for a user who installs ``sigreg`` beside their torch.
"""

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import sigreg
from sigreg._extras import EXTRAS

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
packaging = pytest.importorskip("packaging.requirements", reason="needs packaging (pip's)")
Requirement = packaging.Requirement


def test_metadata_core_deps_extras_and_license():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated table
    (torch,) = [Requirement(r) for r in project["dependencies"]]
    assert torch.name == "torch" and all(s.operator == ">=" for s in torch.specifier)
    extras = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():  # what the console script and imports check
        assert {Requirement(r).name for r in extras[extra]} == set(modules)
    dev = {Requirement(r).name: Requirement(r).extras for r in extras["dev"]}
    assert {"lightning", "transformers"} <= dev["sigreg"]  # `make test` runs every test
    assert project["scripts"]["sigreg"] == "sigreg._console:main"


def test_extras_declare_lower_bounds_and_constraints_pin_our_environment():
    """Users install sigreg beside their own stack: every extra gives a lower bound, no exact
    version and no cap; the exact versions of our own dev/CI environment are in
    constraints.txt, which make setup uses, and they satisfy the ranges."""
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pinned[req.name.lower()] = spec.version
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        for text in requirements:
            req = Requirement(text)
            if req.name == "sigreg":
                continue
            assert {s.operator for s in req.specifier} == {">="}, (extra, text)
            assert req.specifier.contains(pinned[req.name.lower()]), (extra, text)
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_the_version_is_written_once():
    """sigreg.__version__ is the package's version: src/sigreg/_version.py holds it and
    pyproject.toml reads it from there when it builds, so there is no second copy to bump."""
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "sigreg._version.__version__"}
    written = [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "src").rglob("*.py"))
               if re.search(r"^__version__\s*=", path.read_text(), re.MULTILINE)]
    assert written == ["src/sigreg/_version.py"]
    from sigreg import _version
    assert sigreg.__version__ == _version.__version__
    assert not re.search(r"^version:", (ROOT / "CITATION.cff").read_text(), re.MULTILINE)
    # make setup reinstalls (and so rewrites the installed metadata) when the version changes.
    assert "src/sigreg/_version.py" in (ROOT / "Makefile").read_text().split("$(STAMP):")[1]


def test_the_installed_metadata_is_this_version():
    """The metadata of the installed sigreg (pip show, importlib.metadata) says the version the
    code says, when it was installed from this checkout (make setup's editable install)."""
    dist = importlib.metadata.distribution("sigreg")
    origin = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    if not origin.startswith("file://") or Path(origin[len("file://"):]).resolve() != ROOT:
        where = origin or dist.locate_file("")
        pytest.skip(f"the sigreg metadata found ({where}) is not an install of {ROOT}")
    assert dist.version == sigreg.__version__, (
        f"installed metadata says {dist.version}, the code {sigreg.__version__}: "
        "reinstall (make setup, or pip install -e .)")


def run(*cmd: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True,
                          **kwargs)


def dependency_closure(name: str) -> list[importlib.metadata.Distribution]:
    """``name``'s installed distribution and everything it requires (no extras)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen[key] = dist
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def expose_torch(site: Path) -> None:
    """Link torch and its dependencies, nothing else, into ``site``."""
    site.mkdir()
    for dist in dependency_closure("torch"):
        top = {f.parts[0] for f in dist.files if f.parts[0] != ".."}
        for name in top:
            source = Path(dist.locate_file(name))
            if source.exists() and not (site / name).exists():
                (site / name).symlink_to(source)


CORE_ONLY_CHECK = textwrap.dedent("""
    import importlib.util, torch, sigreg
    assert sigreg.__file__.startswith(sys.prefix), sigreg.__file__  # the wheel, not the tree
    for module in ("numpy", "matplotlib", "tqdm", "lightning", "transformers"):
        assert importlib.util.find_spec(module) is None, module
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    handle = sigreg.attach(model, torch.nn.Linear, sketch_dim=4)
    handle.combine(model(torch.randn(32, 8)).pow(2).mean()).backward()
    try:
        import sigreg.integrations.lightning
    except ImportError as err:
        assert "pip install 'sigreg[lightning]'" in str(err), err
    else:
        raise AssertionError("sigreg.integrations.lightning imported without lightning")
    print("core ok")
""")


def test_wheel_and_sdist_build_and_the_wheel_works_core_only(tmp_path):
    dist = tmp_path / "dist"
    build = run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "deprecat" not in (build.stdout + build.stderr).lower()
    (wheel,) = dist.glob("sigreg-*.whl")
    assert len(list(dist.glob("sigreg-*.tar.gz"))) == 1
    info = zipfile.ZipFile(wheel)
    metadata = info.read(next(n for n in info.namelist() if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    assert "Requires-Dist: torch>=2.4\n" in metadata
    assert f"\nVersion: {sigreg.__version__}\n" in metadata  # read from src/sigreg/_version.py

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", "--without-pip", venv).returncode == 0
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
                   .stdout.strip())
    expose_torch(tmp_path / "torch-only")
    (purelib / "torch-only.pth").write_text(str(tmp_path / "torch-only") + "\n")
    # The fresh venv sees only what it holds: no PYTHONPATH=src (whose sigreg.egg-info, left by
    # the build, would make pip skip the install as already done).
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                  "--no-index", "-q", wheel, env=clean)
    assert install.returncode == 0, install.stderr

    check = run(python, "-c", "import sys\n" + CORE_ONLY_CHECK, cwd=tmp_path, env=clean)
    assert check.returncode == 0 and "core ok" in check.stdout, check.stderr
    script = run(venv / "bin" / "sigreg", "presets", cwd=tmp_path, env=clean)
    assert script.returncode == 1
    assert script.stdout == ""
    # One line of ours, last; torch itself warns first that it found no numpy.
    assert script.stderr.count("sigreg:") == 1
    assert script.stderr.splitlines()[-1] == (
        "sigreg: the command line needs the [train] extra (missing numpy, matplotlib, tqdm): "
        "pip install 'sigreg[train]'")


def test_import_sigreg_does_not_import_dynamo():
    """torch._dynamo takes ~2 s to import: `import sigreg` leaves it to the first attach or
    distributed loss, and costs about what its own modules do."""
    check = run(sys.executable, "-c", "import sys, sigreg; print('torch._dynamo' in sys.modules, "
                "'sigreg.train' in sys.modules, 'matplotlib' in sys.modules)",
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "False False False"


def test_console_help_loads_no_trainer():
    """`sigreg --help` parses before the trainer, its runtime, the report or matplotlib load."""
    code = ("import sys\nfrom sigreg._console import main\nsys.argv[:] = ['sigreg', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('sigreg.train.trainer', 'sigreg.train.runtime', "
            "'sigreg.train.report', 'matplotlib', 'torch._dynamo') if m in sys.modules))")
    check = run(sys.executable, "-c", code, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert check.returncode == 0, check.stderr
    assert "usage: sigreg" in check.stdout and check.stdout.strip().endswith("[]")


FAKE_PYTHON = """#!/bin/sh
# Logs each call; `-m venv DIR` makes DIR/bin/python this same script.
echo "$*" >> "$MAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_installs_the_train_extra_and_make_test_everything(tmp_path):
    """`make demo` on a fresh clone installs torch and [train] only; `make test` after it adds
    the rest; a second `make demo` installs nothing. A fake python logs what make asks."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt", "src/sigreg/_version.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "apt-get").write_text("#!/bin/sh\nexit 1\n")  # no Debian package here
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MAKE_LOG": str(log)}

    def make(target: str) -> list[str]:
        start = len(log.read_text().splitlines()) if log.exists() else 0
        done = run("make", "--no-print-directory", target, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return log.read_text().splitlines()[start:]

    def installs(calls: list[str]) -> list[str]:
        return [c.split(" -e ")[1] for c in calls if " -e " in c]

    demo = make("demo")
    assert demo[0] == "-m venv .venv" and "-m pip install -q torch==2.13.0" in demo
    assert installs(demo) == [".[train]"] and demo[-1] == "-m sigreg.train.demo"
    test = make("test")
    assert installs(test) == [".[train,lightning,transformers,docs,dev]"]
    assert test[-1] == "-m pytest -q" and "torch==2.13.0" not in " ".join(test)
    assert make("demo") == ["-m sigreg.train.demo"]
    (tmp_path / ".venv").rename(tmp_path / "old")  # a fresh clone: `make test` alone
    assert installs(make("test")) == [".[train,lightning,transformers,docs,dev]"]
