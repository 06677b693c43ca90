"""The package version, written once: pyproject.toml reads it from here when it builds."""

__version__ = "0.2.0"
