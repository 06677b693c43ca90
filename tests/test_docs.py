"""The documentation site (mkdocs.yml, docs/): it builds strictly, its API reference covers the
public API, its quickstart runs, and a broken link or include fails the build.

The build needs the [docs] extra, which make setup installs: CI runs these tests.
"""

import ast
import importlib.util
import logging
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sigreg

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOCS_EXTRA = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "pymdownx")


def needs_docs_extra() -> None:
    for module in DOCS_EXTRA:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"needs the [docs] extra ({module}): pip install -e '.[docs]'")


def load_hooks():
    needs_docs_extra()
    spec = importlib.util.spec_from_file_location("sigreg_docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def test_the_docs_build_strictly(tmp_path):
    """mkdocs build --strict: a broken link or anchor, a missing include, an API entry that
    does not resolve or a docstring the reference cannot read is a warning, and fails it."""
    needs_docs_extra()
    site = tmp_path / "site"
    start = time.perf_counter()
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        check=False, cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    seconds = time.perf_counter() - start
    assert build.returncode == 0, build.stdout + build.stderr
    assert "WARNING" not in build.stderr, build.stderr
    assert seconds < 60, f"the docs took {seconds:.0f} s to build"
    pages = {p.relative_to(site).parent.as_posix() for p in site.rglob("index.html")}
    assert {".", "getting-started", "guide", "integrations", "toolkit", "studies",
            "cpu-scale-results", "benchmarks", "changelog", "api/attach", "api/losses",
            "api/sketch", "api/integrations"} <= pages
    losses = (site / "api" / "losses" / "index.html").read_text()
    assert "weak_sigreg" in losses and "Examples" in losses  # rendered from the docstrings
    # Sphinx roles of the docstrings read as code (docs/griffe_roles.py), not literally.
    for page in ("attach", "losses", "sketch", "integrations"):
        html = (site / "api" / page / "index.html").read_text()
        assert not re.search(r":(func|class|meth|attr|mod):", html), page
    assert "<code>sigreg.attach</code>" in (site / "api" / "attach" / "index.html").read_text()
    # The pages that include other files hold them.
    assert "Benchmark results" in (site / "benchmarks" / "index.html").read_text()
    assert "0.2.0" in (site / "changelog" / "index.html").read_text()


def public_names(path: Path) -> list[str]:
    """A module's ``__all__``, read without importing it (its framework may be absent)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__"
                                                for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no __all__")


def test_the_api_reference_covers_the_public_api():
    """Every name of sigreg.__all__ and of the integrations' __all__ has an entry (`::: path`)
    in docs/api/, and each core entry is the object `sigreg.<name>` gives."""
    entries = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for path in re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.MULTILINE):
            entries[path.rsplit(".", 1)[1]] = path
    integrations = ROOT / "src" / "sigreg" / "integrations"
    wanted = set(sigreg.__all__)
    for name in ("lightning", "transformers"):
        wanted |= {f"{name}:{n}" for n in public_names(integrations / f"{name}.py")}
    documented = set(entries) | {f"{p.split('.')[2]}:{n}" for n, p in entries.items()
                                 if p.startswith("sigreg.integrations.")}
    assert wanted <= documented, sorted(wanted - documented)
    for name in sigreg.__all__:
        module, _, attr = entries[name].rpartition(".")
        assert getattr(importlib.import_module(module), attr) is getattr(sigreg, name), name


def test_the_quickstart_runs(tmp_path, capsys, one_thread):
    """The Python of docs/getting-started.md, run as one script, as a reader would paste it."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / "getting-started.md").read_text(),
                        re.MULTILINE | re.DOTALL)
    assert blocks
    script = tmp_path / "quickstart.py"
    script.write_text("\n".join(blocks))
    namespace = runpy.run_path(str(script))
    out = capsys.readouterr().out
    assert "training accuracy" in out and "hidden.5" in out, out
    assert not any(m._forward_hooks for m in namespace["model"].modules())  # handle.remove()
    assert isinstance(namespace["loss"], torch.Tensor)


def test_the_readme_quickstart_runs(tmp_path, capsys, one_thread):
    """The README's Quickstart block alone, as a newcomer would copy it: it trains and prints
    one regularizer value per hidden layer."""
    readme = (DOCS.parent / "README.md").read_text()
    quickstart = readme[readme.index("## Quickstart"):]
    block = re.search(r"^```python\n(.*?)^```", quickstart, re.MULTILINE | re.DOTALL).group(1)
    script = tmp_path / "readme_quickstart.py"
    script.write_text(block)
    namespace = runpy.run_path(str(script))
    values = namespace["handle"].layer_losses()
    assert list(values) == ["0", "2", "4", "6", "8", "10"], values
    assert str(values) in capsys.readouterr().out


class Recorded(logging.Handler):
    """The warnings a logger emits (the suite may run without pytest's logging plugin)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_links_out_of_docs_are_checked_and_includes_must_exist(tmp_path):
    """A link to a repository file outside docs/ that does not exist is a warning (so a strict
    build fails); one that exists becomes the path (or a repo_url link); links from included
    files are read from where they were written; a missing include or heading stops the build."""
    hooks = load_hooks()
    (tmp_path / "docs").mkdir()
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "run.py").write_text("")
    text = ("[the script](examples/run.py), [gone](examples/gone.py), "
            "[studies](docs/studies.md#alpha), `[code](not/a/link.py)`")
    recorded = Recorded()
    hooks.log.addHandler(recorded)  # a logger under "mkdocs": --strict counts its warnings
    try:
        out = hooks.rewrite_links(text, "README.md", "docs/guide.md", tmp_path, None)
    finally:
        hooks.log.removeHandler(recorded)
    assert hooks.log.name.startswith("mkdocs.")
    assert out.startswith("the script (`examples/run.py`), [gone](examples/gone.py), "
                          "[studies](studies.md#alpha), `[code](not/a/link.py)`")
    assert recorded.messages == [
        "README.md: the link to 'examples/gone.py' names examples/gone.py, which does not exist"]
    linked = hooks.rewrite_links("[x](examples/run.py)", "README.md", "docs/a/b.md", tmp_path,
                                 "https://example.org/sigreg/")
    assert linked == "[x](https://example.org/sigreg/blob/main/examples/run.py)"

    (tmp_path / "README.md").write_text("# T\n## One\n```bash\n# not a heading\n```\n"
                                        "### Sub\ntext\n## Two\nrest\n")
    assert hooks.rewrite_links("[a](../../README.md)", "docs/api/x.md", "docs/api/x.md",
                               tmp_path, None) == "a (`README.md`)"
    pieces = hooks.include('<!-- include README.md "One" -->\n', tmp_path, "docs/p.md")
    assert "".join(text for text, _ in pieces) == (
        "# One\n```bash\n# not a heading\n```\n## Sub\ntext\n")
    assert ("# One\n```bash\n# not a heading\n```\n## Sub\ntext\n", "README.md") in pieces
    for line in ('<!-- include README.md "Three" -->\n', "<!-- include NOPE.md -->\n"):
        with pytest.raises(hooks.PluginError):
            hooks.include(line, tmp_path, "docs/p.md")
    assert hooks.blank_line_before_blocks("para\n- item\n| a |\n```\nx\n- y\n```") == (
        "para\n\n- item\n| a |\n```\nx\n- y\n```")
