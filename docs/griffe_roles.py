"""Griffe extension (mkdocs.yml, mkdocstrings' ``extensions:``): Sphinx roles in docstrings
read as code on the site.

The docstrings use Sphinx's cross-reference roles (``:func:`sigreg.attach```), which ``help()``
and IDEs show as they are; mkdocstrings renders Markdown, where a role would show literally.
Each role becomes its target as inline code: ``:func:`~sigreg.auto.AutoWeight``` reads
``AutoWeight`` (Sphinx's ``~``: the last component only), ``:meth:`x.y``` reads ``x.y``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def plain(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRolesAsCode(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(plain, obj.docstring.value)
