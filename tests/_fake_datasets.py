"""Tiny dataset files in the exact official on-disk formats, for tests.

CIFAR batches were written by Python 2: their strings are pickled as Python 2 ``str``
(SHORT_BINSTRING/BINSTRING opcodes, read back as ``bytes`` with ``encoding='bytes'``) and numpy
arrays refer to ``numpy.core.multiarray._reconstruct``. Python 3's pickler writes bytes
differently (via ``_codecs.encode``), so a small Python-2-style pickler reproduces the real thing.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us swap opcode writers
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def __init__(self, file: io.BytesIO, numpy_module: str) -> None:
        super().__init__(file, protocol=2)
        self.numpy_module = numpy_module

    def save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":  # name it as numpy 1.x did
            self.write(pickle.GLOBAL + f"{self.numpy_module}\n_reconstruct\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj: Any, numpy_module: str = "numpy.core.multiarray") -> bytes:
    """Pickle ``obj`` the way Python 2 + numpy 1.x wrote the CIFAR files."""
    buf = io.BytesIO()
    _Py2Pickler(buf, numpy_module).dump(obj)
    return buf.getvalue()


def cifar_batch(n: int, label_key: str, num_classes: int, seed: int) -> dict[str, Any]:
    """One batch dict with the official keys; images are random, labels cycle through classes."""
    rng = np.random.default_rng(seed)
    return {
        "batch_label": f"batch {seed}",
        label_key: [int(i % num_classes) for i in range(n)],
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "filenames": [f"img_{seed}_{i}.png" for i in range(n)],
    }


def write_cifar(root: Path, which: str, n: int = 20, tarball: bool = False,
                numpy_module: str = "numpy.core.multiarray") -> dict[str, list[dict[str, Any]]]:
    """Write a tiny CIFAR-10/100 in the official folder (or tarball) layout under ``root``.

    Returns ``{"train": [batch, ...], "test": [batch]}`` for checking what was loaded.
    """
    if which == "cifar10":
        folder, names, test, key, classes = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
            "labels", 10)
    else:
        folder, names, test, key, classes = "cifar-100-python", ["train"], "test", "fine_labels", 100
    batches = {"train": [cifar_batch(n, key, classes, s) for s in range(len(names))],
               "test": [cifar_batch(n, key, classes, 99)]}
    files = {name: py2_pickle(b, numpy_module) for name, b in zip(names, batches["train"])}
    files[test] = py2_pickle(batches["test"][0], numpy_module)
    root.mkdir(parents=True, exist_ok=True)
    if tarball:
        archive = "cifar-10-python.tar.gz" if which == "cifar10" else "cifar-100-python.tar.gz"
        with tarfile.open(root / archive, "w:gz") as tar:
            add_dir(tar, folder)
            for name, payload in files.items():
                add_file(tar, f"{folder}/{name}", payload)
    else:
        (root / folder).mkdir()
        for name, payload in files.items():
            (root / folder / name).write_bytes(payload)
    return batches


def add_file(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, raw data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist(folder: Path, n_train: int = 30, n_test: int = 20,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four gzipped IDX files; returns the arrays written, keyed by file name."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (folder / name).write_bytes(gzip.compress(idx_bytes(array)))
    return arrays
