"""``sigreg`` command line: presets, train, compare, data download, probe, sweep."""

from __future__ import annotations

import argparse
import errno
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ._words import count
from .checkpoint import WriteError
from .config import TrainConfig, apply_overrides, settings_help, show
from .data import DATASETS, DataError, download_dataset
from .presets import PRESETS, get_preset, preset_config
from .rundir import FREE_ON_RESUME, plan

# The trainer, its runtime and the report load when a command runs: `sigreg --help` and a
# mistyped option answer without them.


def cmd_presets(args: argparse.Namespace) -> None:
    if args.show:
        preset = get_preset(args.show)  # ValueError naming the valid presets
        paper = f" [paper: {preset.paper:.2f}%]" if preset.paper is not None else ""
        print(f"# {preset.name}: {preset.description}{paper}")
        print(show(preset_config(args.show)))
        return
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        paper = f"  [paper: {preset.paper:.2f}%]" if preset.paper is not None else ""
        print(f"{name:{width}s}  {preset.description}{paper}")


def cmd_train(args: argparse.Namespace) -> None:
    from .runtime import launched_rank
    from .trainer import train

    cfg = apply_overrides(preset_config(args.preset), args.set)
    out = args.out or Path("runs") / args.preset
    summary = train(cfg, out, resume=args.resume, overwrite=args.overwrite,
                    allow_changes=args.allow_change, progress=not args.no_progress)
    if launched_rank() == 0:  # under torchrun every rank gets the summary; one prints it
        print(f"{args.preset}: final test acc {summary['final_test_acc']:.2%}, "
              f"best {summary['best_test_acc']:.2%} (epoch {summary['best_epoch']}); "
              f"files in {out}")


def describe(name: str, cfg: TrainConfig, overrides: Sequence[str]) -> str:
    """The preset's description as ``cfg`` runs it: its "N epochs" says ``cfg.epochs``, and
    the ``--set`` items follow it."""
    text = re.sub(r"\b\d+ epochs\b", count(cfg.epochs, "epoch"), get_preset(name).description)
    return text + (f"; --set {' '.join(overrides)}" if overrides else "")


def run_comparison(presets: Sequence[str], overrides: Sequence[str], out: Path, *,
                   progress: bool = True) -> dict:
    """Train each preset into ``out/<preset>`` and write the report files into ``out``.

    A run that finished there with the same settings is reused, an interrupted one resumed
    (see :func:`sigreg.train.sweep.train_or_skip`).
    """
    from .report import markdown, write_report
    from .sweep import train_or_skip

    configs = {name: apply_overrides(preset_config(name), list(overrides)) for name in presets}
    for name, cfg in configs.items():
        plan(cfg, out / name, resume="auto")  # every run's settings and path, before any runs
    for i, (name, cfg) in enumerate(configs.items(), 1):
        print(f"[{i}/{len(configs)}] {name}: {describe(name, cfg, overrides)}", flush=True)
        train_or_skip(cfg, out / name, progress)
    res = write_report({name: out / name for name in configs}, out)
    print()
    print(markdown(res))
    print(f"wrote {out / 'report.md'}, {out / 'curves.png'}, {out / 'results.json'}")
    return res


def cmd_compare(args: argparse.Namespace) -> None:
    for name in args.presets:
        get_preset(name)  # fail on a typo before hours of training
    if len(set(args.presets)) != len(args.presets):
        raise ValueError("each preset may appear once in --presets")
    run_comparison(args.presets, args.set, args.out, progress=not args.no_progress)


def cmd_data_download(args: argparse.Namespace) -> None:
    path = download_dataset(args.name, args.dir)
    print(f"{args.name} is ready in {path}")


def cmd_probe(args: argparse.Namespace) -> None:
    from .probe import find_run_dirs, probe_runs

    if args.max_samples is not None and args.max_samples < 2:
        raise ValueError(f"--max-samples must be at least 2, got {args.max_samples}")
    runs = find_run_dirs(args.run)
    # One directory given: results go next to its runs; otherwise into runs/probe.
    single_dir = len(args.run) == 1 and Path(args.run[0]).is_dir()
    out = args.out or (Path(args.run[0]) if single_dir else Path("runs/probe"))
    table = probe_runs(runs, out, batch_size=args.batch_size, max_samples=args.max_samples,
                       device=args.device, dataset=args.dataset, data_dir=args.data_dir)
    print()
    print(table)
    print(f"wrote {out / 'probe.json'}, {out / 'probe.png'}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep import markdown as sweep_markdown
    from .sweep import parse_list, run_sweep

    alphas = parse_list(args.alpha, float, "--alpha")
    sketch_dims = parse_list(args.sketch_dim, int, "--sketch-dim")
    if args.seeds < 1:
        raise ValueError(f"--seeds is a count of seeds and must be at least 1, got {args.seeds}")
    get_preset(args.preset)
    out = args.out or Path("runs") / f"sweep-{args.preset}"
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    result = run_sweep(args.preset, alphas, sketch_dims, args.seeds, out, args.set,
                       jobs=args.jobs, progress=not args.no_progress and args.jobs == 1)
    print()
    print(sweep_markdown(result))
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep.png'}, {out / 'sweep.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sigreg", description="Train, compare and inspect SIGReg-regularized models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("presets", help="list the named presets, or show one's settings")
    p.add_argument("--show", metavar="NAME",
                   help="print every setting of the preset NAME, one key=value a line")
    p.set_defaults(func=cmd_presets)

    def add_run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override settings, e.g. --set epochs=5 lr=3e-3 model.depth=4")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("train", help="train one preset", epilog=settings_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="a name from `sigreg presets`")
    p.add_argument("--out", type=Path, help="run directory (default runs/<preset>)")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode,
                   metavar="auto",
                   help="continue from checkpoint.pt in the run directory (an error if there "
                        "is none); `--resume auto` starts afresh where there is none")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run the directory holds (refused without this flag)")
    p.add_argument("--allow-change", type=_key_list, default=[], metavar="KEY[,KEY]",
                   help="on --resume, settings that may differ from the checkpoint's (e.g. "
                        f"lr,grad_clip); {', '.join(FREE_ON_RESUME)} always may")
    add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several presets and write a comparison report",
                       epilog=settings_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", required=True, help="names from `sigreg presets`")
    p.add_argument("--out", type=Path, default=Path("runs/compare"),
                   help="report directory; finished runs there with the same settings are "
                        "reused, interrupted ones resumed")
    add_run_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("probe", help="layer diagnostics of trained runs on their test set")
    p.add_argument("--run", nargs="+", required=True, metavar="PATH",
                   help="run directories, directories whose subdirectories are runs, or "
                        "checkpoint files")
    p.add_argument("--out", type=Path,
                   help="where probe.json/probe.png go (default: the one run directory, "
                        "else runs/probe)")
    p.add_argument("--dataset", choices=DATASETS,
                   help="probe on this dataset's test split (default: each run's own)")
    p.add_argument("--data-dir", help="where the dataset lives (default: where the run found it)")
    p.add_argument("--max-samples", type=int, help="probe only the first N test images")
    p.add_argument("--batch-size", type=int, default=1000, help="test images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device for the probe (default cpu)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("sweep", help="train a -weak/-strong preset over alpha x sketch dim x seeds")
    p.add_argument("--preset", required=True, help="a -weak or -strong name from `sigreg presets`")
    p.add_argument("--alpha", required=True, help="comma-separated weights, e.g. 0.01,0.1,0.3")
    p.add_argument("--sketch-dim", required=True, help="comma-separated K, e.g. 16,64,256")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1 (default 3)")
    p.add_argument("--out", type=Path, help="sweep directory (default runs/sweep-<preset>)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once in separate processes (default 1); small runs "
                        "leave a GPU mostly idle, so e.g. 12 fill it far better")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override settings of the preset (not alpha, sketch_dim or seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = data_sub.add_parser("download", help="download a dataset and verify its MD5")
    d.add_argument("name", choices=[n for n in DATASETS if n != "synthetic"])
    d.add_argument("--dir", type=Path, default=Path("data"), help="target directory")
    d.set_defaults(func=cmd_data_download)
    return parser


def _resume_mode(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {text!r}")
    return text


def _key_list(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


# How each training command goes on where it stopped (after Ctrl-C, or a write that failed).
CONTINUE = {
    "train": "rerun with --resume",
    "compare": "rerun the same command (finished runs are reused, the interrupted one resumed)",
    "sweep": "rerun the same command (finished runs are reused, interrupted ones resumed)",
}


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: object = None, line: str | None = None) -> None:
    """A warning as one line, as errors are (Python's own form takes two, the second the
    source line of the call that warned, meaningless to someone who typed a command)."""
    print(f"sigreg: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .trainer import TrainingDiverged

    goes_on = CONTINUE.get(args.command)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args.func(args)
    except (ValueError, DataError, TrainingDiverged, OSError) as exc:
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, WriteError) and goes_on:
            fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
            text += f": {fix}, then {goes_on}"
        print(f"sigreg: error: {' '.join(text.split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("sigreg: interrupted" + (f"; the last finished epoch is saved: {goes_on}"
                                       if goes_on else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
