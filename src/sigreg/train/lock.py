"""One writer per run directory: an advisory lock, held while a process writes the run.

Whoever writes a run directory (``sigreg train``; each run of ``compare`` and ``sweep``; rank
0 under torchrun) first takes an exclusive ``flock`` on ``<run>/run.lock`` and holds it until
it is done; the file holds the holder's PID, for the message a second writer gets. The OS
releases a flock when its holder dies, however it dies (``kill -9`` included), so a lock file
left by a dead process is stale by construction: the next writer locks it and writes its own
PID. No PID is ever tested for liveness (PIDs are reused); the flock alone decides.

The holder deletes the file when it is done, so that a run directory holds the run's files
only. A waiter may by then hold an open descriptor of the deleted file; :func:`_lock`
therefore checks, once it holds the lock, that the file it locked is still the one at the
path, and starts over otherwise (the usual pattern for lock files that are deleted).

Without ``fcntl`` (Windows) there is no lock: a second writer is not stopped there.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK = "run.lock"

# Run directories this process holds, with how many nested holds: train_or_skip holds the
# lock around train(), which takes it again (a second flock of the same file from this
# process would conflict with the first).
_held: dict[tuple[int, Path], int] = {}


class RunLocked(ValueError):
    """Another process is writing the run directory; nothing was written."""

    def __init__(self, out: Path, pid: int | None) -> None:
        self.out, self.pid = out, pid
        holder = f"PID {pid}" if pid else "another process"
        super().__init__(f"{out} is being written by {holder} (a sigreg train, compare or "
                         f"sweep; see {out / LOCK}): wait for it to finish or stop it, or "
                         "choose another --out")


@contextlib.contextmanager
def hold(out: str | Path, *, wait: bool = False,
         log: Callable[[str], Any] | None = None) -> Iterator[None]:
    """Hold the lock of run directory ``out`` for the ``with`` block, creating ``out`` if
    needed (and removing it again, and the parents created with it, if nothing else was
    written there).

    Args:
        wait: block until the holder is done, instead of raising :class:`RunLocked`.
        log: where a waiter says once whom it waits for.
    """
    out = Path(out)
    key = (os.getpid(), out.resolve())
    if fcntl is None or key in _held:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _release_count(key)
        return
    created = _missing_parents(out)
    try:
        fd = _lock(out, wait, log)
    except BaseException:
        _remove_empty(created)
        raise
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        # Unlink while holding the lock: whoever locks the file next finds it gone (_lock).
        (out / LOCK).unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(created)


def _release_count(key: tuple[int, Path]) -> None:
    _held[key] -= 1
    if not _held[key]:
        del _held[key]


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories a start created, innermost first, unless it wrote in them."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not empty (or not ours to remove): it stays, and so do its parents
            break


def _missing_parents(out: Path) -> list[Path]:
    """``out`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    path = out.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def _lock(out: Path, wait: bool, log: Callable[[str], Any] | None) -> int:
    """An open descriptor of ``out/run.lock`` holding its flock, our PID written in it."""
    path = out / LOCK
    announced = False
    while True:
        out.mkdir(parents=True, exist_ok=True)  # again after a holder removed what it made
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise RunLocked(out, _holder(fd)) from None
                if log is not None and not announced:
                    pid = _holder(fd)
                    log(f"  {out.name}: {f'PID {pid}' if pid else 'another process'} is "
                        "writing it; waiting for it to finish")
                    announced = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _still_at(fd, path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # we locked a file its holder had deleted: lock the one at the path now


def _still_at(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _holder(fd: int, patience: float = 1.0) -> int | None:
    """The PID in the lock file. A holder writes it right after locking, so an empty file
    is read again for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
