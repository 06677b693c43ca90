"""Start-up cost: ``import torch``, ``import sigreg`` and ``sigreg --help``, each in a fresh process.

    PYTHONPATH=src .venv/bin/python benchmarks/import_time.py --rounds 15 --json out.json

Each round runs every arm once, in a shuffled order (so load on the machine hits all arms
alike), as a new interpreter; the wall time of the whole process is what a user waits for.
Reported: each arm's median, and each arm over ``import torch`` as the median of the per-round
ratios with a bootstrap 95 % interval. Target: ``import sigreg`` at most 1.2x ``import torch``.
Then, once per arm, which of the heavy modules it loaded (torch._dynamo, the toolkit
sigreg.train, matplotlib): ``import sigreg`` should load none of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from _timing import bootstrap_ci, command_line, interleaved, write_json

from sigreg.train.provenance import provenance

HELP = "import sys; from sigreg._console import main; sys.argv[0] = 'sigreg'; sys.exit(main())"
# Prints, after the arm's own work, the loaded modules that a start-up should not need.
HEAVY = ("import sys, json; print(json.dumps(sorted(m for m in sys.modules if m in "
         "('torch._dynamo', 'matplotlib', 'sigreg.train.trainer') or m == 'sigreg.train')))")


def arms() -> dict[str, list[str]]:
    """Arm -> command. ``sigreg --help`` runs the installed console script's entry point
    (``sigreg._console:main``) in this interpreter, so it sees the same ``sigreg`` as the
    other arms (``PYTHONPATH=src`` included)."""
    python = sys.executable
    return {"python": [python, "-c", "pass"],
            "import torch": [python, "-c", "import torch"],
            "import sigreg": [python, "-c", "import sigreg"],
            "sigreg --help": [python, "-c", HELP, "--help"]}


def run_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def heavy_modules(cmd: list[str]) -> list[str]:
    """The heavy modules loaded by ``cmd`` (``-c CODE``): its code, then :data:`HEAVY`."""
    python, flag, code, *args = cmd
    wrapped = f"try:\n    exec({code!r})\nexcept SystemExit:\n    pass\n{HEAVY}"
    out = subprocess.run([python, flag, wrapped, *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first, not counted")
    parser.add_argument("--seed", type=int, default=0, help="of the arms' order per round")
    parser.add_argument("--json", help="write the raw times and the summary here")
    parser.add_argument("--quick", action="store_true", help="one round, no warm-up (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 1, 0
    print(command_line())
    made_by = provenance()  # the code as it is when the timing starts

    commands = arms()
    times = interleaved(list(commands), args.rounds, args.warmup, args.seed,
                        lambda name: run_once(commands[name]))

    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {}
    for name in ("import sigreg", "sigreg --help"):
        per_round = [a / b for a, b in zip(times[name], times["import torch"])]
        lo, hi = bootstrap_ci(per_round)
        ratios[name] = {"median": statistics.median(per_round), "ci95": [lo, hi]}
    loaded = {name: heavy_modules(cmd) for name, cmd in commands.items() if name != "python"}

    print(f"{args.rounds} rounds (+{args.warmup} warm-up), fresh process per arm, "
          f"arms shuffled per round")
    print(f"{'arm':15s} {'median s':>9s}  {'/ import torch':>24s}  heavy modules loaded")
    for name in commands:
        ratio = ratios.get(name)
        text = (f"{ratio['median']:.3f} ({ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f})"
                if ratio else "")
        print(f"{name:15s} {medians[name]:9.3f}  {text:>24s}  "
              f"{', '.join(loaded.get(name, [])) or '-'}")
    result = {
        "benchmark": "import_time", "command": command_line(), "rounds": args.rounds,
        "warmup": args.warmup, "seed": args.seed, "arms": {n: c[1:] for n, c in commands.items()},
        "provenance": made_by,
        "median_s": medians, "ratio_to_import_torch": ratios, "heavy_modules_loaded": loaded,
        "times_s": times,
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
