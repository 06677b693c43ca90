"""The ``Examples:`` of the public docstrings run, and say what they print.

Every object of ``sigreg.__all__`` and of the integrations' ``__all__`` carries an example
(Google style, ``>>>``: the API reference of the docs site shows it). Each runs here as a
doctest: seeded, on the CPU, a few seconds in all. ``pytest --doctest-modules
src/sigreg/functional.py`` runs one module's the same way.
"""

import ast
import doctest
import importlib
import importlib.util
import io
import time
from pathlib import Path

import pytest

import sigreg

SRC = Path(__file__).resolve().parents[1] / "src" / "sigreg"
CORE = ["sigreg.attach", "sigreg.functional", "sigreg.modules", "sigreg.sketch",
        "sigreg.distributed"]
# Modules of an extra: their examples run where the extra is installed (make setup: CI).
EXTRA = {"sigreg.integrations.lightning": ("lightning",),
         "sigreg.integrations.transformers": ("transformers", "accelerate")}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", CORE + list(EXTRA))
def test_the_docstring_examples_run(name, one_thread, tmp_path, monkeypatch):
    for module in EXTRA.get(name, ()):
        pytest.importorskip(module, reason=f"{name}'s examples need the extra with {module}")
    monkeypatch.chdir(tmp_path)  # whatever an example writes stays out of the tree
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    start = time.perf_counter()
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.write)
    seconds = time.perf_counter() - start
    assert runner.tries > 0, f"{name} has no examples"
    assert runner.failures == 0, report.getvalue()
    assert seconds < 20, f"{name}'s examples took {seconds:.1f} s"


def docstrings(path: Path) -> dict[str, str]:
    """The docstrings of a module's top-level functions and classes, read without importing
    it (its framework may be absent), and its ``__all__``."""
    tree = ast.parse(path.read_text())
    docs = {node.name: ast.get_docstring(node) or "" for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    (names,) = [ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign)
                and any(getattr(t, "id", "") == "__all__" for t in node.targets)]
    return {name: docs[name] for name in names}


def test_every_public_object_has_an_example():
    public = {name: getattr(sigreg, name).__doc__ or "" for name in sigreg.__all__}
    for module in ("lightning", "transformers"):
        for name, doc in docstrings(SRC / "integrations" / f"{module}.py").items():
            public[f"sigreg.integrations.{module}.{name}"] = doc
    missing = [name for name, doc in public.items()
               if "\n    Examples:\n" not in doc and "\nExamples:\n" not in doc or ">>>" not in doc]
    assert not missing, f"no Examples: section with >>> in {missing}"
    # Every example that runs is run by test_the_docstring_examples_run.
    assert {importlib.util.find_spec(getattr(sigreg, n).__module__).name
            for n in sigreg.__all__} <= set(CORE)
