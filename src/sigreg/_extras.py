"""Optional extras: which importable modules each one brings, and the one-line hint to install it."""

from __future__ import annotations

import importlib.util

# Import names (not distribution names) that each extra of pyproject.toml provides.
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("numpy", "matplotlib", "tqdm"),
    "lightning": ("lightning",),
    "transformers": ("transformers", "accelerate"),
}


def missing(extra: str) -> list[str]:
    """Modules of ``extra`` that cannot be imported here (found without importing them)."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def hint(extra: str, what: str) -> str:
    """``"<what> needs the [extra] extra (missing ...): pip install 'sigreg[extra]'"``."""
    return (f"{what} needs the [{extra}] extra (missing {', '.join(missing(extra))}): "
            f"pip install 'sigreg[{extra}]'")


def require(extra: str, what: str) -> None:
    """Raise ImportError with :func:`hint` when a module of ``extra`` is missing."""
    if missing(extra):
        raise ImportError(hint(extra, what))
