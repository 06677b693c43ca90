"""Atomic checkpoints (never a half-written file) loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ._words import count


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Replace ``path`` all at once: ``write`` fills a temporary file in the same directory,
    which is fsynced and renamed over ``path``, then the directory is fsynced. A crash
    leaves the old file or the new one, at worst plus a ``*.tmp`` (a resume deletes those).
    The file gets the permissions of any new file (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        cause = _os_error(exc)
        if cause is None:
            raise
        # torch.save turns a full disk into "unexpected pos ..." raised while handling the
        # OSError; the OSError is what the user can act on.
        error = WriteError(f"cannot write {path} ({cause.strerror or cause}); the file there "
                           "is unchanged")
        error.errno, error.path = cause.errno, path
        raise error from exc
    _fsync_directory(path.parent)  # the rename itself survives a power cut


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty ``<name>.<random>.tmp`` beside ``path``, open for writing. Created with
    mode 0666 so that the umask decides, as for any file a program creates (mkstemp's 0600
    would keep a team's other users out of the run)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another name, then
            continue


class WriteError(OSError):
    """A file could not be written (a full disk, ...); the file at ``path`` is unchanged."""

    path: Path


def _os_error(exc: BaseException) -> OSError | None:
    """The first OSError of the chain that ended in ``exc`` (None for an interrupt, or a
    chain without one)."""
    if not isinstance(exc, Exception):
        return None
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return next((e for e in reversed(chain) if isinstance(e, OSError)), None)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through :func:`write_atomic`: never a half-written checkpoint."""
    write_atomic(path, lambda f: torch.save(state, f))


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointError(pickle.UnpicklingError, ValueError):
    """The file is not a readable sigreg checkpoint (a ValueError, for clear CLI errors)."""


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing pickled code (tensors and plain containers only).

    Raises CheckpointError for a file that is not one written by the trainer, including one
    that would need to run code to load.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{path} is not a readable sigreg checkpoint "
                              f"({type(exc).__name__}: {first})") from exc
    if not isinstance(state, dict) or not {"config", "model"} <= set(state):
        raise CheckpointError(f"{path} is not a sigreg checkpoint (no config and model in it)")
    return state


def check_fields(state: dict[str, Any], path: Path, epochs: int) -> None:
    """Check the entries of a trainer's checkpoint other than those :func:`restore` loads
    into the run's objects: ``epoch`` (an epoch of the ``epochs`` its config runs), ``rows``
    (the rows of those epochs), ``provenance`` and the random states. CheckpointError naming
    the entry; run before anything is written, so a doctored checkpoint costs nothing."""
    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; it was not written by this trainer or is "
                               "damaged (resume from another copy, or --overwrite)")

    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= epochs:
        raise damaged(f"its 'epoch' is {epoch!r}, not a finished epoch of the "
                      f"{count(epochs, 'epoch')} its config runs")
    if "rows" in state:  # checkpoints of older versions have none
        rows = state["rows"]
        if not (isinstance(rows, list) and all(isinstance(r, dict) and isinstance(r.get("kind"), str)
                                               and isinstance(r.get("epoch"), int) for r in rows)):
            raise damaged("its 'rows' are not a list of metrics rows")
        numbered = [r["epoch"] for r in rows if r["kind"] == "epoch"]
        if numbered != list(range(1, epoch + 1)):
            raise damaged(f"its 'rows' hold epochs {numbered}, not 1 to {epoch}")
    provenance = state.get("provenance", [])
    if not (isinstance(provenance, list) and all(isinstance(p, dict) for p in provenance)):
        raise damaged("its 'provenance' is not a list of records")
    _check_random_states(state, damaged)


def _check_random_states(state: dict[str, Any], damaged: Callable[[str], Exception]) -> None:
    """Every rank's augmenter and CPU streams (or the single ones of older checkpoints) are
    states a CPU generator takes; the CUDA ones are byte tensors (checked where restored)."""
    if "rng_ranks" in state:
        ranks = state["rng_ranks"]
        if not (isinstance(ranks, dict) and {"augmenter", "cpu"} <= set(ranks)
                and all(isinstance(v, list) and v for v in ranks.values())
                and len({len(v) for v in ranks.values()}) == 1):
            raise damaged("its 'rng_ranks' do not hold one augmenter and one CPU state per rank")
        cpu_states, others = [*ranks["augmenter"], *ranks["cpu"]], ranks.get("cuda", [])
    else:
        augmenter = state.get("augmenter")
        if not isinstance(augmenter, dict) or "rng_cpu" not in state:
            raise damaged("it holds no random states")
        cpu_states, others = [augmenter.get("generator"), state["rng_cpu"]], [state.get("rng_cuda")]
    for value in cpu_states:
        try:
            torch.Generator().set_state(value)
        except (RuntimeError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise damaged(f"a random state in it is not one ({first})") from None
    if not all(v is None or (isinstance(v, torch.Tensor) and v.dtype == torch.uint8)
               for v in others):
        raise damaged("a CUDA random state in it is not a byte tensor")


def restore(target: Any, state: dict[str, Any], key: str, path: Path) -> None:
    """``target.load_state_dict(state[key])``, with a CheckpointError naming what is wrong
    (a missing entry, other tensor shapes) instead of a KeyError or a size-mismatch dump."""
    if key not in state:
        raise CheckpointError(f"{path} has no {key!r} entry; it was not written by this trainer "
                              f"or is damaged")
    try:
        target.load_state_dict(state[key])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: its {key!r} does not fit this run ({first})") from exc
