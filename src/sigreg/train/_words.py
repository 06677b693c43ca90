"""Small wording helpers for what the toolkit prints."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def count(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``: ``n`` and ``noun``, plural unless ``n`` is 1."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to a mistyped ``word``, or
    ``""`` where none is close (difflib's ratio >= 0.6)."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
