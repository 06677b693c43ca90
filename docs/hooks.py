"""MkDocs hooks (mkdocs.yml `hooks:`): pages built from the repository's own Markdown files.

Includes. A line ``<!-- include PATH -->`` in a page stands for the file PATH (relative to the
repository root); ``<!-- include PATH "Heading" -->`` for the section of PATH under the one
heading that starts with ``Heading``, up to the next heading of its level or above, with its
headings raised so that the section's own is the page's title. The README, the changelog and
benchmarks/RESULTS.md stay the one copy of what they say; a missing file or heading stops the
build.

Links. Every relative link is read from the file it was written in (a page, or the file a page
includes), so the same Markdown works on GitHub and here:

- a link into docs/ is rewritten relative to the page, and MkDocs checks it as usual (strict:
  a missing page or anchor fails the build);
- a link to another file of the repository (a script, a raw results file) must name a file
  that exists (if not: a warning, which fails ``--strict``) and points at it in the repository
  when mkdocs.yml sets ``repo_url``; without one it becomes the path, as code.

Python-Markdown wants a blank line before a list or a table that follows a paragraph line
(GitHub does not): the hook adds it, outside code blocks.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.sigreg")

INCLUDE = re.compile(r'^<!-- include (?P<path>[^\s"]+)(?: "(?P<heading>[^"]+)")? -->\s*$')
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target), with an optional "title"; code spans are cut out first.
LINK = re.compile(r'(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(\s+"[^"]*")?\s*\)')
CODE_SPAN = re.compile(r"(`+).*?\1")
BLOCK_START = re.compile(r"^(- |\* |\|)")
NOT_PARAGRAPH = re.compile(r"^(\s|- |\* |\||#|>|\d+\. |<)")


def code_lines(lines: list[str]) -> list[bool]:
    """For each line, whether it belongs to a fenced code block (the fences included)."""
    inside, flags = False, []
    for line in lines:
        fence = bool(FENCE.match(line))
        flags.append(inside or fence)
        if fence:
            inside = not inside
    return flags


def section(text: str, heading: str, where: str) -> str:
    """The section of ``text`` under the one heading that starts with ``heading``, raised so
    that this heading is a level-1 title."""
    lines = text.splitlines()
    code = code_lines(lines)
    found = [(i, len(m.group(1))) for i, line in enumerate(lines)
             if not code[i] and (m := HEADING.match(line)) and m.group(2).startswith(heading)]
    if len(found) != 1:
        raise PluginError(f'{where}: {len(found)} headings start with "{heading}", not one')
    start, level = found[0]
    end = next((i for i in range(start + 1, len(lines)) if not code[i]
                and (m := HEADING.match(lines[i])) and len(m.group(1)) <= level), len(lines))
    out = []
    for i in range(start, end):
        m = None if code[i] else HEADING.match(lines[i])
        out.append(lines[i][level - 1:] if m else lines[i])
    return "\n".join(out) + "\n"


def include(markdown: str, root: Path, page: str) -> list[tuple[str, str]]:
    """The page as pieces (text, the repository file it was written in)."""
    pieces: list[tuple[str, str]] = []
    lines = markdown.splitlines(keepends=True)
    code = code_lines(lines)
    own: list[str] = []
    for line, in_code in zip(lines, code):
        m = None if in_code else INCLUDE.match(line)
        if not m:
            own.append(line)
            continue
        pieces.append(("".join(own), page))
        own = []
        path = root / m.group("path")
        if not path.is_file():
            raise PluginError(f"{page}: includes {m.group('path')}, which does not exist")
        text = path.read_text(encoding="utf-8")
        if m.group("heading"):
            text = section(text, m.group("heading"), f"{page} includes {m.group('path')}")
        pieces.append((text, m.group("path")))
    pieces.append(("".join(own), page))
    return pieces


def rewrite_links(text: str, origin: str, page: str, root: Path, repo_url: str | None,
                  docs: str = "docs") -> str:
    """Relative links of ``text`` (written in the repository file ``origin``) as the page
    ``page`` (a repository path under ``docs``, the docs folder) needs them."""
    origin_dir = posixpath.dirname(origin)
    page_dir = posixpath.dirname(page)

    def one(m: re.Match) -> str:
        bang, label, target, title = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        if re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|#|/)", target):
            return m.group(0)  # a URL, an anchor of this page, an absolute path
        path, _, anchor = target.partition("#")
        anchor = "#" + anchor if anchor else ""
        repo_path = posixpath.normpath(posixpath.join(origin_dir, path))
        if repo_path.startswith("../"):
            log.warning(f"{origin}: the link to '{target}' leaves the repository")
            return m.group(0)
        if repo_path == docs or repo_path.startswith(docs + "/"):
            new = posixpath.relpath(repo_path, page_dir or ".") + anchor
            return f"{bang}[{label}]({new}{title})"
        if not (root / repo_path).exists():
            log.warning(f"{origin}: the link to '{target}' names {repo_path}, which does not exist")
            return m.group(0)
        if bang:
            log.warning(f"{origin}: the image {repo_path} is outside {docs}/; put it there")
            return m.group(0)
        if repo_url:
            return f"[{label}]({repo_url.rstrip('/')}/blob/main/{repo_path}{anchor}{title})"
        shown = label.strip("`")
        return f"`{repo_path}`" if shown == repo_path else f"{label} (`{repo_path}`)"

    out = []
    for line in text.split("\n"):
        pieces, last = [], 0
        for span in CODE_SPAN.finditer(line):  # links inside `code` are not links
            pieces.append(LINK.sub(one, line[last:span.start()]) + span.group(0))
            last = span.end()
        out.append("".join(pieces) + LINK.sub(one, line[last:]))
    return "\n".join(out)


def blank_line_before_blocks(text: str) -> str:
    """A blank line before a list or table that starts right after a paragraph line."""
    lines = text.split("\n")
    code = code_lines(lines)
    out: list[str] = []
    for i, line in enumerate(lines):
        prev = lines[i - 1] if i else ""
        if (not code[i] and i and not code[i - 1] and BLOCK_START.match(line)
                and prev.strip() and not NOT_PARAGRAPH.match(prev)):
            out.append("")
        out.append(line)
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = Path(config.config_file_path).resolve().parent
    docs = Path(config.docs_dir).resolve().relative_to(root).as_posix()
    page_path = posixpath.join(docs, page.file.src_uri)
    return "".join(
        blank_line_before_blocks(
            rewrite_links(text, origin, page_path, root, config.repo_url, docs))
        for text, origin in include(markdown, root, page_path))
