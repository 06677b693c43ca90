"""The ``sigreg`` console script: the training CLI, or one line saying which extra it needs.

The script is installed with the core package, but the CLI lives in :mod:`sigreg.train`,
which needs the ``[train]`` extra.
"""

from __future__ import annotations

import sys

from ._extras import hint, missing


def main() -> int:
    if missing("train"):
        print(f"sigreg: {hint('train', 'the command line')}", file=sys.stderr)
        return 1
    from .train.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
