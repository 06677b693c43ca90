"""A run directory's lifecycle: what is written, in which order, and how resume repairs it.

Files (rank 0 writes them all):

- ``checkpoint.pt``: the commit point of an epoch. Model, optimizer, every rank's random
  streams, and every metrics row up to and including that epoch.
- ``metrics.jsonl``: a view of those rows for people and tools: monitor rows are appended
  live during an epoch, the epoch row right after the checkpoint.
- ``config.json``: the effective settings; ``summary.json``: written when the last epoch is
  committed.
- ``provenance.json``: one record per start of the run (sigreg version, git commit and
  dirtiness, torch, device, threads, date; :mod:`sigreg.train.provenance`), the earlier
  starts' taken from the checkpoint; ``summary.json`` repeats the list.
- ``tensorboard/``: events, another view of the rows: removed at every start, then rebuilt
  from the rows by the trainer and appended to live.

At the end of epoch e the order is: (1) ``checkpoint.pt`` atomically (temporary file, fsync,
rename, fsync of the directory), (2) the epoch row appended to ``metrics.jsonl``, (3) after the
last epoch, ``summary.json`` atomically. A crash anywhere in that sequence leaves either the
checkpoint of epoch e-1 or that of epoch e. Resume repairs by construction: it rewrites
``metrics.jsonl`` from the checkpoint's rows (dropping rows of the unfinished epoch, restoring
a row the crash kept from being appended), deletes left-over temporary files and, when the
checkpoint already holds the last epoch, only writes ``summary.json``.

One writer at a time: whoever writes a run directory holds its lock (:func:`claim`,
:mod:`sigreg.train.lock`) from before it reads the checkpoint until it ends, so a second
``train``, ``--resume`` or ``--overwrite`` is refused (``compare`` and ``sweep`` wait) instead
of mixing two runs' rows. Everything a start can refuse (paths, mode, changed settings) is
checked by :func:`plan`, which writes nothing; :meth:`RunDir.begin` is the first write.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint, lock
from ._words import count
from .config import FREE, NEVER, SETTINGS, TrainConfig

CHECKPOINT, METRICS, CONFIG, SUMMARY = "checkpoint.pt", "metrics.jsonl", "config.json", "summary.json"
PROVENANCE = "provenance.json"
TENSORBOARD = "tensorboard"
# Each setting declares its rule (``resume=`` in sigreg.train.config). Free: settings that do
# not change what the finished epochs computed may differ on resume (``epochs`` extends or
# shortens what is left; the cosine schedule follows the new length). Fixed: never changeable
# on resume, another preset is another run. Any other setting changes only with --allow-change.
FREE_ON_RESUME = tuple(k for k, s in SETTINGS.items() if s.resume == FREE)
FIXED_ON_RESUME = tuple(k for k, s in SETTINGS.items() if s.resume == NEVER)
RESUME_MODES = (False, True, "auto")


class RunDirError(ValueError):
    """The run directory cannot be used as asked; nothing was written."""


class SettingsChanged(RunDirError):
    """Resuming would change settings that were not allowed to change."""


@dataclass
class Start:
    """What :func:`plan` decided: the settings to run with and where to begin."""

    cfg: TrainConfig
    state: dict[str, Any] | None = None  # the checkpoint resumed from
    changes: dict[str, list[Any]] = field(default_factory=dict)  # key: [old, new]
    replace: bool = False  # an existing run is being replaced (--overwrite)

    @property
    def epoch(self) -> int:
        return self.state["epoch"] if self.state else 0

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.state.get("rows", [])) if self.state else []

    @property
    def provenance(self) -> list[dict[str, Any]]:
        """The records of the starts that made the checkpoint (none in older checkpoints)."""
        return list(self.state.get("provenance", [])) if self.state else []


def _check_location(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; the run directory must be a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"--out {out}: {parent} is a file, not a directory")
    try:  # root passes os.access everywhere; a real (deleted) file is the honest test
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot write in {parent} ({exc.strerror})") from None


def claim(out: str | Path, *, wait: bool = False,
          log: Callable[[str], Any] | None = None) -> AbstractContextManager[None]:
    """The lock of the run directory ``out`` (see :func:`sigreg.train.lock.hold`), taken
    once the path is known to be usable. Raises RunLocked (a ValueError) naming the holder's
    PID where another process holds it, unless ``wait``."""
    _check_location(Path(out))
    return lock.hold(out, wait=wait, log=log)


def _setting_changes(old: TrainConfig, new: TrainConfig) -> dict[str, list[Any]]:
    before, after = json.loads(json.dumps(old.to_dict())), json.loads(json.dumps(new.to_dict()))
    return {k: [before[k], after[k]] for k in after if before.get(k) != after[k]}


def _check_changes(out: Path, changes: dict[str, list[Any]], allow: Sequence[str],
                   done: int, epochs: int) -> None:
    fixed = [k for k in FIXED_ON_RESUME if k in changes]
    if fixed:
        old, new = changes[fixed[0]]
        raise RunDirError(f"--resume: {out} holds a run of preset {old!r}, not {new!r}; use "
                          f"another --out, or --overwrite to replace that run")
    refused = [k for k in changes if k not in FREE_ON_RESUME and k not in allow]
    if refused:
        listed = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused)
        raise SettingsChanged(f"--resume: settings differ from the checkpoint in {out}: {listed}; "
                          f"add --allow-change {','.join(refused)} to change them deliberately "
                          f"(recorded in metrics.jsonl), or drop those --set items")
    if epochs < done:
        raise RunDirError(f"--resume: epochs={epochs} is fewer than the {count(done, 'epoch')} "
                          f"{out} has finished already")


def plan(cfg: TrainConfig, out: str | Path, *, resume: bool | str = False,
         overwrite: bool = False, allow_changes: Sequence[str] = ()) -> Start:
    """Decide how a run starts in ``out`` without writing anything.

    Args:
        cfg: the settings asked for (validated here).
        out: the run directory.
        resume: ``True`` continues from the checkpoint, which must exist; ``"auto"`` continues
            if there is one and starts afresh otherwise; ``False`` starts afresh, which is
            refused where a checkpoint exists unless ``overwrite``.
        overwrite: replace whatever run ``out`` holds.
        allow_changes: settings that may differ from the checkpoint's on resume, beyond
            :data:`FREE_ON_RESUME`.

    Raises:
        RunDirError (a ValueError) naming what is wrong; CheckpointError for a checkpoint
        that cannot be read.
    """
    out = Path(out)
    cfg.validate()
    if resume not in RESUME_MODES:
        raise RunDirError(f"resume must be one of False, True, 'auto', got {resume!r}")
    unknown = sorted(set(allow_changes) - set(cfg.to_dict()))
    if unknown:
        raise RunDirError(f"--allow-change: unknown setting(s) {', '.join(unknown)}")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run or "
                          "replace it")
    _check_location(out)
    ckpt_path = out / CHECKPOINT
    if not ckpt_path.exists():
        if resume is True:
            raise RunDirError(f"--resume: no {CHECKPOINT} in {out} (nothing finished an epoch "
                              f"there); run without --resume, or with --resume auto")
        return Start(cfg, replace=overwrite)
    if overwrite:
        return Start(cfg, replace=True)
    state = checkpoint.load(ckpt_path)
    saved = _saved_config(state, ckpt_path)
    checkpoint.check_fields(state, ckpt_path, saved.epochs)
    if not resume:
        done = f"finished ({count(state['epoch'], 'epoch')})" if state["epoch"] >= saved.epochs else \
            f"at epoch {state['epoch']}/{saved.epochs}"
        raise RunDirError(f"{out} already holds a run {done}; --resume continues it, "
                          f"--overwrite replaces it, or choose another --out")
    changes = _setting_changes(saved, cfg)
    _check_changes(out, changes, allow_changes, state["epoch"], cfg.epochs)
    return Start(cfg, state, changes)


def _saved_config(state: dict[str, Any], path: Path) -> TrainConfig:
    """The settings a checkpoint was trained with; CheckpointError for ones this version
    cannot read (at least their number of epochs, which the resume rules compare)."""
    config = state["config"]
    try:
        saved = TrainConfig.from_dict(config) if isinstance(config, dict) else None
    except (TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{path}: its 'config' cannot be read ({exc})") from None
    if saved is None or isinstance(saved.epochs, bool) or not isinstance(saved.epochs, int) \
            or saved.epochs < 1:
        raise checkpoint.CheckpointError(f"{path}: its 'config' is not a trainer's settings; "
                                         "it was not written by this trainer or is damaged")
    return saved


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file; a last line cut short by a crash is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Replace the text file ``path`` all at once (see :func:`checkpoint.write_atomic`)."""
    checkpoint.write_atomic(path, lambda f: f.write(text.encode()))


def summarize(rows: list[dict[str, Any]], cfg: TrainConfig,
              provenance: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The run's summary, derived from its epoch rows, with the starts' provenance."""
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    best = max(epochs, key=lambda r: r["test_acc"], default=None)  # first of equal ones
    return {
        "final_test_acc": epochs[-1]["test_acc"] if epochs else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else 0,
        "epochs": cfg.epochs,
        "train_time": sum(r["epoch_time"] for r in epochs),
        "config": cfg.to_dict(),
        "provenance": list(provenance),
    }


class RunDir:
    """One run directory, written in the order the module docstring gives.

    Every rank keeps the rows (so every rank can summarise the run); only the one made with
    ``write=True`` (rank 0) touches the files.
    """

    def __init__(self, out: str | Path, write: bool = True) -> None:
        self.out = Path(out)
        self.write = write
        self.checkpoint = self.out / CHECKPOINT
        self.metrics = self.out / METRICS
        self.tensorboard = self.out / TENSORBOARD
        self.rows: list[dict[str, Any]] = []
        self.provenance: list[dict[str, Any]] = []

    def begin(self, start: Start, provenance: dict[str, Any] | None = None) -> None:
        """The first write: repair or reset the directory for ``start``, whose record
        ``provenance`` joins those of the starts the checkpoint came from."""
        self.provenance = [*start.provenance, *([provenance] if provenance else [])]
        self.rows = start.rows if start.state is None or "rows" in start.state else \
            [r for r in read_rows(self.metrics) if r["epoch"] <= start.epoch]  # old checkpoint
        if not self.write:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        # Left by a save that was killed: no other process is writing here (the lock).
        for tmp in self.out.glob("*.tmp"):
            tmp.unlink()
        if start.replace:
            for name in (CHECKPOINT, SUMMARY):
                (self.out / name).unlink(missing_ok=True)
        # A view of the rows, rebuilt from them by the trainer: whatever an earlier start
        # wrote (an interrupted epoch's events included) goes.
        shutil.rmtree(self.tensorboard, ignore_errors=True)
        if start.state is not None and start.epoch < start.cfg.epochs:
            (self.out / SUMMARY).unlink(missing_ok=True)  # the run goes on: no longer final
        write_atomic(self.out / CONFIG, json.dumps(start.cfg.to_dict(), indent=2) + "\n")
        write_atomic(self.out / PROVENANCE, json.dumps(self.provenance, indent=2) + "\n")
        write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in self.rows))
        if start.changes:
            self.log_row({"kind": "resume", "epoch": start.epoch, "changed": start.changes})

    def log_row(self, row: dict[str, Any]) -> None:
        """Append a row now; it becomes permanent with the next checkpoint."""
        self.rows.append(row)
        if not self.write:
            return
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def commit_epoch(self, state: dict[str, Any], row: dict[str, Any]) -> None:
        """(1) the checkpoint, holding ``row`` and every row before it, (2) the row."""
        if self.write:
            checkpoint.save_atomic({**state, "rows": [*self.rows, row],
                                    "provenance": self.provenance}, self.checkpoint)
        self.log_row(row)

    def finish(self, cfg: TrainConfig) -> dict[str, Any]:
        """(3) ``summary.json``, once the last epoch is committed."""
        summary = summarize(self.rows, cfg, self.provenance)
        if self.write:
            write_atomic(self.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return summary
