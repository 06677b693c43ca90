"""Renamed keywords: the old name keeps working for one release, with a FutureWarning that
names the new one.

Renamed after 0.1.0, one name per concept: K, the width of the projection (sketch columns
or directions), is ``sketch_dim`` everywhere (it was ``num_directions`` in
:func:`sigreg.strong_sigreg`, :class:`sigreg.StrongSIGReg` and :func:`sigreg.draw_directions`);
the choice between a fresh sketch every step and a fixed one is ``sketch_policy`` (it was
``sketch``, which also names the matrix S) in :func:`sigreg.attach`, the modules,
:func:`sigreg.make_regularizer`, the integrations and the trainer's settings.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_message(old: str, new: str, where: str, kind: str = "keyword") -> str:
    """The warning for ``old``, a renamed keyword (attribute, setting) of ``where``."""
    return (f"{where}: the {kind} {old!r} is deprecated and will be removed in the next "
            f"release; use {new!r} (same meaning, same values)")


def translate(kwargs: dict[str, Any], renames: Mapping[str, str], where: str,
              stacklevel: int = 3) -> dict[str, Any]:
    """``kwargs`` with each old keyword of ``renames`` given under its new name, warning
    (FutureWarning) once per old keyword used.

    Raises:
        TypeError if a keyword is given under both its old and its new name.
    """
    if not kwargs or renames.keys().isdisjoint(kwargs):
        return kwargs
    out = dict(kwargs)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise TypeError(f"{where}: got both {old!r} (deprecated) and {new!r}; give only "
                            f"{new!r}")
        warnings.warn(renamed_message(old, new, where), FutureWarning,
                      stacklevel=stacklevel)
        out[new] = out.pop(old)
    return out


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorator: the function also accepts each ``old=new`` keyword under its old name
    (see :func:`translate`). The signature shown (``help``, ``inspect``) is the new one."""

    def decorate(fn: F) -> F:
        where = "sigreg." + fn.__qualname__.replace(".__init__", "")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **translate(kwargs, renames, where))

        wrapper.renamed_keywords = dict(renames)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate
