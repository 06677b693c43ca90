"""Image datasets for the training toolkit: CIFAR-10/100, Fashion-MNIST and a synthetic set.

Everything is loaded into memory as uint8 tensors ``(N, C, H, W)``; normalisation and
augmentation happen later, on the device. Files are read in their official layouts, so a
dataset fetched by hand, by ``download_dataset`` or from a Debian package all work the same.
Every problem a user can fix surfaces as a :class:`DataError` with a message saying how.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import inspect
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "synthetic")

# Official locations. Tests swap entries of CHECKSUMS to serve tiny fakes of these files.
CIFAR_URL = "https://www.cs.toronto.edu/~kriz"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
CHECKSUMS: dict[str, str] = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12e480ee83cd310",
}
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Where the Debian package `dataset-fashion-mnist` puts the files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataError(Exception):
    """A dataset problem the user can fix (missing, corrupt or unsafe files, bad options)."""


@dataclass(frozen=True)
class _Cifar:
    """What differs between CIFAR-10 and CIFAR-100."""

    title: str
    tarball: str
    folder: str  # the directory the tarball unpacks to
    train_files: tuple[str, ...]
    test_file: str
    label_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR = {
    "cifar10": _Cifar(
        "CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", b"labels", 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _Cifar(
        "CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python",
        ("train",), "test", b"fine_labels", 100,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
    ),
}
# Computed once from the 60000 real training images (pixel values / 255, all pixels pooled).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


# --------------------------------------------------------------------------- the dataset


@dataclass(eq=False, repr=False)
class ImageDataset:
    """A labelled image classification dataset held in memory as uint8 tensors."""

    name: str
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor  # uint8 (M, C, H, W)
    test_labels: torch.Tensor  # int64 (M,)
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Cheap checks so a malformed dataset fails here, not deep inside a training step.
        for split in ("train", "test"):
            images: torch.Tensor = getattr(self, f"{split}_images")
            labels: torch.Tensor = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise DataError(f"{self.name}: {split} images must be uint8 (N, C, H, W), "
                                f"got {images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise DataError(f"{self.name}: {split} labels must be int64 of length "
                                f"{len(images)}, got {labels.dtype} {tuple(labels.shape)}")
        channels = self.train_images.shape[1]
        if self.test_images.shape[1:] != self.train_images.shape[1:]:
            raise DataError(f"{self.name}: train and test images differ in shape")
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(f"{self.name}: mean/std need {channels} values, one per channel")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        # The default dataclass repr would print every pixel.
        return (f"ImageDataset({self.name!r}, train={len(self.train_labels)}, "
                f"test={len(self.test_labels)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")

    def subset(self, num_train: int | None = None, num_test: int | None = None,
               seed: int = 0) -> ImageDataset:
        """A random, class-balanced subset; ``None`` keeps a split whole.

        Classes are taken round-robin (one random example of each class, then a second, ...),
        so every class is represented as evenly as the data allows. Same seed, same subset.
        """
        train = _balanced_indices(self.train_labels, num_train, self.num_classes, seed, "train")
        test = _balanced_indices(self.test_labels, num_test, self.num_classes, seed + 1, "test")
        return ImageDataset(
            self.name,
            self.train_images[train].contiguous(), self.train_labels[train],
            self.test_images[test].contiguous(), self.test_labels[test],
            self.num_classes, self.mean, self.std,
        )

    def to(self, device: torch.device | str) -> ImageDataset:
        """A copy with all tensors on ``device`` (e.g. to keep a small dataset on the GPU)."""
        return ImageDataset(
            self.name,
            self.train_images.to(device), self.train_labels.to(device),
            self.test_images.to(device), self.test_labels.to(device),
            self.num_classes, self.mean, self.std,
        )


def _balanced_indices(labels: torch.Tensor, count: int | None, num_classes: int, seed: int,
                      split: str) -> torch.Tensor:
    """Sorted indices of ``count`` examples picked round-robin over classes in random order."""
    n = len(labels)
    if count is None:
        return torch.arange(n)
    if not 0 < count <= n:
        raise DataError(f"cannot take {count} {split} examples: the split has {n}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    shuffled = labels.cpu()[perm]
    # rank = how many examples of the same class come earlier in the shuffled order.
    by_class = torch.argsort(shuffled, stable=True)
    counts = torch.bincount(shuffled, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(shuffled)
    rank[by_class] = torch.arange(n) - starts[shuffled[by_class]]
    chosen = perm[torch.argsort(rank, stable=True)[:count]]
    return chosen.sort().values.to(labels.device)


# --------------------------------------------------------------------------- loading


def default_data_dir() -> Path:
    """``$SIGREG_DATA`` if set, else ``./data``."""
    env = os.environ.get("SIGREG_DATA")
    return Path(env).expanduser() if env else Path.cwd() / "data"


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    key = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist"}.get(
        key, key)
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False,
                 **synthetic_kwargs: Any) -> ImageDataset:
    """Load a dataset by name (see ``DATASETS``) from ``data_dir`` (default: ``default_data_dir()``).

    With ``download=True`` missing files are fetched first. Keyword arguments configure the
    ``synthetic`` dataset only (see :func:`make_synthetic`).
    """
    key = _canonical(name)
    if key == "synthetic":
        unknown = set(synthetic_kwargs) - set(inspect.signature(make_synthetic).parameters)
        if unknown:
            raise DataError(f"unknown synthetic dataset options {sorted(unknown)}; "
                            f"see sigreg.train.data.make_synthetic")
        return make_synthetic(**synthetic_kwargs)
    if synthetic_kwargs:
        raise DataError(f"options {sorted(synthetic_kwargs)} only apply to the synthetic dataset")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if key in _CIFAR:
        return _load_cifar(key, root, download)
    # An explicit data_dir is the only place looked in: training on another copy than the
    # one asked for would record the wrong path.
    return _load_fashion_mnist(root, download, system_copy=data_dir is None)


def _load_cifar(key: str, root: Path, download: bool) -> ImageDataset:
    spec = _CIFAR[key]
    folder = root / spec.folder
    if not folder.is_dir():
        if not (root / spec.tarball).is_file():
            if not download:
                raise DataError(
                    f"{spec.title} not found in {root}. Run `sigreg data download {key} "
                    f"--dir {root}`, or put {spec.tarball} ({CIFAR_URL}/{spec.tarball}) in {root}.")
            download_dataset(key, root)
        _extract_tarball(root / spec.tarball, root, spec.folder)

    def read(file: str) -> tuple[np.ndarray, np.ndarray]:
        return _read_cifar_batch(folder / file, spec.label_key, spec.num_classes)

    train = [read(f) for f in spec.train_files]
    test_images, test_labels = read(spec.test_file)
    return ImageDataset(
        key,
        torch.from_numpy(np.concatenate([x for x, _ in train])),
        torch.from_numpy(np.concatenate([y for _, y in train])),
        torch.from_numpy(test_images), torch.from_numpy(test_labels),
        spec.num_classes, spec.mean, spec.std,
    )


def _extract_tarball(tarball: Path, root: Path, folder: str) -> None:
    """Unpack ``tarball`` into ``root`` so that ``root/folder`` appears complete or not at all."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".part", dir=root))
    except OSError as err:
        raise DataError(f"cannot unpack {tarball.name}: {root} is not writable ({err})") from err
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                # A hostile archive could write outside root or plant links; refuse those.
                if m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise DataError(f"refusing to unpack {tarball}: unsafe path {m.name!r}")
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"refusing to unpack {tarball}: {m.name!r} is not a "
                                    f"regular file or directory")
            # Python >= 3.10.12 can also vet members itself; use that where available.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **safe)
        if not (staging / folder).is_dir():
            raise DataError(f"{tarball} does not contain {folder}/; is it the right file? "
                            f"Delete it and download it again.")
        try:
            os.replace(staging / folder, root / folder)  # atomic: never a half-unpacked folder
        except OSError:
            if not (root / folder).is_dir():  # else another process unpacked it meanwhile
                raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{tarball} is corrupt or truncated ({err}); "
                        f"delete it and download it again.") from err
    except OSError as err:
        raise DataError(f"could not unpack {tarball} into {root}: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core (the old name still works but warns).
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batch files contain: builtin containers and numpy arrays.

    A pickle can name any importable callable and run it on load, so anything beyond the
    three numpy globals below is refused before it is even imported.
    """

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    })

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # the files come from Python 2
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to load {self.path}: it asks for {module}.{name}, which "
                            f"no CIFAR file contains (the file may be malicious)")
        return _numpy_reconstruct() if name == "_reconstruct" else getattr(np, name)


def _read_cifar_batch(path: Path, label_key: bytes,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from one CIFAR batch file."""
    hint = f"delete {path.parent} and unpack or download the dataset again"
    if not path.is_file():
        raise DataError(f"{path} is missing; {hint}")
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways; all mean "corrupt"
        raise DataError(f"{path} is corrupt ({type(err).__name__}: {err}); {hint}") from err
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path} is not a CIFAR batch (no {b'data'!r}/{label_key!r}); {hint}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path} has malformed labels; {hint}") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} "
                        f"{data.shape}; {hint}")
    in_range = labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes)
    if labels.shape != (len(data),) or not in_range:
        raise DataError(f"{path}: labels do not match the images; {hint}")
    # Rows are 1024 red, then green, then blue values, each row-major: exactly (3, 32, 32).
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


def _load_fashion_mnist(root: Path, download: bool, system_copy: bool = True) -> ImageDataset:
    candidates = [root, root / "fashion-mnist"] + ([FASHION_MNIST_SYSTEM_DIR] if system_copy else [])
    folder = next((d for d in candidates
                   if all((d / f).is_file() for f in FASHION_MNIST_FILES)), None)
    if folder is None:
        if not download:
            missing = ""
            for d in candidates:  # point at a half-filled folder: the likely culprit
                lacking = [f for f in FASHION_MNIST_FILES if not (d / f).is_file()]
                if len(lacking) < len(FASHION_MNIST_FILES):
                    missing = f" ({d} lacks {', '.join(lacking)})"
                    break
            raise DataError(
                f"Fashion-MNIST not found in {' or '.join(map(str, candidates))}{missing}. "
                f"Run `sigreg data download fashion-mnist --dir {root}`, or `apt-get install dataset-fashion-mnist`, or put the four "
                f"*-ubyte.gz files in {root}.")
        folder = download_dataset("fashion-mnist", root)
    train_x = _read_idx(folder / "train-images-idx3-ubyte.gz", ndim=3)
    train_y = _read_idx(folder / "train-labels-idx1-ubyte.gz", ndim=1)
    test_x = _read_idx(folder / "t10k-images-idx3-ubyte.gz", ndim=3)
    test_y = _read_idx(folder / "t10k-labels-idx1-ubyte.gz", ndim=1)
    for x, y, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if len(x) != len(y):
            raise DataError(f"Fashion-MNIST in {folder}: {len(x)} {split} images but {len(y)} "
                            f"labels; the files do not belong together")
        if y.size and y.max() >= 10:
            raise DataError(f"Fashion-MNIST in {folder}: {split} labels exceed 9; corrupt file")
    return ImageDataset(
        "fashion-mnist",
        torch.from_numpy(train_x[:, None]), torch.from_numpy(train_y.astype(np.int64)),
        torch.from_numpy(test_x[:, None]), torch.from_numpy(test_y.astype(np.int64)),
        10, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes with ``ndim`` dimensions.

    Layout: 2 zero bytes, a type byte (0x08 = ubyte), a dimension count, then one big-endian
    uint32 per dimension, then the data in row-major order.
    """
    hint = "delete it and download it again"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as err:
        raise DataError(f"{path} is missing") from err
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"{path} is corrupt or truncated ({err}); {hint}") from err
    header = 4 + 4 * ndim
    magic = 0x0800 + ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path} is not an IDX file with magic {magic:#010x}; {hint}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: header promises {'x'.join(map(str, dims))} bytes of data but "
                        f"the file holds {len(raw) - header}; {hint}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def make_synthetic(num_train: int = 512, num_test: int = 256, image_size: int = 32,
                   channels: int = 3, num_classes: int = 10, seed: int = 0) -> ImageDataset:
    """A learnable toy dataset: each class is a smooth random prototype image plus noise.

    Prototypes are low-frequency (a 4x4 grid upsampled), so random crops and flips keep them
    recognisable and a small network beats chance within a few steps. Deterministic per seed.
    """
    for key, value in (("num_train", num_train), ("num_test", num_test),
                       ("image_size", image_size), ("channels", channels)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"synthetic dataset: {key} must be a positive integer, got {value!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise DataError(f"synthetic dataset: num_classes must be >= 2, got {num_classes!r}")
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(num_classes, channels, 4, 4, generator=gen)
    prototypes = torch.nn.functional.interpolate(
        grid, size=(image_size, image_size), mode="bilinear", align_corners=False) * 255

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes  # balanced classes, then shuffled
        labels = labels[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, channels, image_size, image_size, generator=gen) * 40
        images = (prototypes[labels] + noise).round().clamp(0, 255).to(torch.uint8)
        return images.contiguous(), labels

    train_x, train_y = sample(num_train)
    test_x, test_y = sample(num_test)
    pixels = train_x.float().div(255).transpose(0, 1).reshape(channels, -1)
    return ImageDataset(
        "synthetic", train_x, train_y, test_x, test_y, num_classes,
        tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist()),
    )


# --------------------------------------------------------------------------- downloading


def download_dataset(name: str, data_dir: str | Path, base_url: str | None = None,
                     progress: bool = True) -> Path:
    """Fetch a dataset's official files into ``data_dir`` and verify their MD5 checksums.

    Files already present with the right checksum are kept. Returns the folder
    that holds the files: ``data_dir`` for CIFAR (the tarball, unpacked on first load) and
    ``data_dir/fashion-mnist`` for Fashion-MNIST. ``base_url`` replaces the official host.
    """
    key = _canonical(name)
    if key == "synthetic":
        raise DataError("the synthetic dataset is generated on the fly; nothing to download")
    root = Path(data_dir).expanduser()
    if key in _CIFAR:
        folder, files, host = root, (_CIFAR[key].tarball,), CIFAR_URL
    else:
        folder, files, host = root / "fashion-mnist", FASHION_MNIST_FILES, FASHION_MNIST_URL
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {folder}: {err}") from err
    for file in files:
        dest = folder / file
        if dest.is_file() and _md5(dest) == CHECKSUMS[file]:
            continue
        _fetch(f"{(base_url or host).rstrip('/')}/{file}", dest, CHECKSUMS[file], progress)
    return folder


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str, progress: bool) -> None:
    """Stream ``url`` into ``dest`` via a temporary ``.part`` file; only a verified file lands.

    Until the checksum matches, the data lives under another name, so an interrupted or
    corrupted download can never be mistaken for the dataset.
    """
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with _progress_bar(expected, dest.name, progress) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != expected:
            raise DataError(f"download of {url} was cut short ({received} of {expected} bytes); "
                            f"try again")
        if digest.hexdigest() != md5:
            raise DataError(f"download of {url} is corrupt (MD5 {digest.hexdigest()}, expected "
                            f"{md5}); try again, or fetch the file by hand into {dest.parent}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        raise DataError(f"could not download {url}: {err}\nCheck the network, or fetch the "
                        f"file by hand and put it in {dest.parent}") from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # no-op after a successful os.replace


class _NoBar:
    """Stands in for tqdm when no progress bar is wanted."""

    def update(self, n: int) -> None:
        return None


def _progress_bar(total: int | None, label: str, enabled: bool) -> Any:
    """A tqdm byte counter if wanted and installed, else a do-nothing stand-in."""
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024)
    return contextlib.nullcontext(_NoBar())
