"""Small wording helpers for what the toolkit prints."""

from __future__ import annotations


def count(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``: ``n`` and ``noun``, plural unless ``n`` is 1."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
