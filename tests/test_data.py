"""Tests for sigreg.train.data, on tiny files in the official formats (no network)."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from _fake_datasets import add_file, idx_bytes, write_cifar, write_fashion_mnist

from sigreg.train import data
from sigreg.train.data import DataError, ImageDataset, download_dataset, load_dataset


@pytest.fixture(autouse=True)
def _no_system_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Keep tests hermetic: the Debian copy of Fashion-MNIST must not leak into them.
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar10_folder_round_trip(tmp_path: Path, numpy_module: str) -> None:
    batches = write_cifar(tmp_path, "cifar10", n=20, numpy_module=numpy_module)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_images.shape == (100, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (20, 3, 32, 32) and ds.train_images.is_contiguous()
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.shape == (20,)
    # Row-major CHW: pixel (c, y, x) sits at c*1024 + y*32 + x of the flat row.
    second = batches["train"][1]
    flat = second["data"][3]
    assert ds.train_images[20 + 3, 2, 5, 7] == flat[2 * 1024 + 5 * 32 + 7]
    assert np.array_equal(ds.train_images[20:40].reshape(20, -1).numpy(), second["data"])
    assert ds.train_labels[:20].tolist() == batches["train"][0]["labels"]
    assert ds.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_from_tarball_unpacks_once(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path, "cifar100", n=30, tarball=True)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.train_images.shape == (30, 3, 32, 32)
    assert ds.train_labels.tolist() == batches["train"][0]["fine_labels"]
    assert np.array_equal(ds.test_images.reshape(30, -1).numpy(), batches["test"][0]["data"])
    # Unpacked to the official folder, with no staging leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cifar-100-python", "cifar-100-python.tar.gz"]
    (tmp_path / "cifar-100-python.tar.gz").unlink()  # the folder alone now suffices
    assert load_dataset("cifar-100", tmp_path).train_images.shape == (30, 3, 32, 32)


def test_missing_cifar_says_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", missing)
    message = str(err.value)
    assert f"sigreg data download cifar100 --dir {missing}" in message
    assert "cifar-100-python.tar.gz" in message


class _Evil:
    """Runs code on unpickling: the attack a restricted unpickler must stop."""

    def __init__(self, call: object, arg: str) -> None:
        self.call, self.arg = call, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return self.call, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused(tmp_path: Path, how: str) -> None:
    write_cifar(tmp_path, "cifar10", n=4)
    marker = tmp_path / "pwned"
    evil = (_Evil(os.system, f"touch '{marker}'") if how == "os.system"
            else _Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()"))
    payload = pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(payload)
    with pytest.raises(DataError, match="refusing to load .*data_batch_3"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-shape"])
def test_corrupt_cifar_batch(tmp_path: Path, damage: str) -> None:
    write_cifar(tmp_path, "cifar10", n=4)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    if damage == "truncated":
        batch.write_bytes(batch.read_bytes()[:5000])
    elif damage == "garbage":
        batch.write_bytes(b"not a pickle at all")
    else:
        batch.write_bytes(pickle.dumps({b"data": np.zeros((4, 10), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_corrupt_tarball(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-batches-py").exists()


@pytest.mark.parametrize("member", ["../escaped", "/tmp/absolute", "link"])
def test_unsafe_tarball_is_refused(tmp_path: Path, member: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        if member == "link":
            info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            add_file(tar, member, b"x")
    with pytest.raises(DataError, match="refusing to unpack"):
        load_dataset("cifar10", root)
    assert not (tmp_path / "escaped").exists()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("sub", ["", "fashion-mnist"])
def test_fashion_mnist_round_trip(tmp_path: Path, sub: str) -> None:
    arrays = write_fashion_mnist(tmp_path / sub, n_train=30, n_test=20)
    ds = load_dataset("fashion_mnist", tmp_path)
    assert ds.train_images.shape == (30, 1, 28, 28) and ds.test_images.shape == (20, 1, 28, 28)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert np.array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    assert ds.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert ds.mean == data.FASHION_MNIST_MEAN and ds.num_classes == 10


def test_fashion_mnist_system_dir_is_searched_by_default_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist(tmp_path / "system", n_train=10, n_test=10)
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setenv("SIGREG_DATA", str(tmp_path / "empty"))
    assert len(load_dataset("fashion-mnist").train_labels) == 10
    # An explicit directory is the only place looked in: no silent fallback to another copy.
    with pytest.raises(DataError, match="not found in") as err:
        load_dataset("fashion-mnist", tmp_path / "empty")
    assert str(tmp_path / "system") not in str(err.value)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # half a dataset
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", tmp_path)
    message = str(err.value)
    assert f"sigreg data download fashion-mnist --dir {tmp_path}" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "lacks train-labels-idx1-ubyte.gz" in message


def _damage(raw: bytes, how: str) -> bytes:
    if how == "truncated-gzip":
        return gzip.compress(raw)[:-20]
    if how == "not-gzip":
        return raw
    if how == "bad-magic":
        return gzip.compress(b"\x00\x00\x08\x01" + raw[4:])
    return gzip.compress(raw[:-1])  # header promises one byte more than there is


@pytest.mark.parametrize("how", ["truncated-gzip", "not-gzip", "bad-magic", "short-data"])
def test_corrupt_idx_file(tmp_path: Path, how: str) -> None:
    write_fashion_mnist(tmp_path, n_train=10, n_test=10)
    raw = idx_bytes(np.zeros((10, 28, 28), np.uint8))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(_damage(raw, how))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", tmp_path)


def test_real_fashion_mnist_if_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    system = Path("/usr/share/datasets/fashion-mnist")
    if not (system / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.setenv("SIGREG_DATA", str(tmp_path))
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    # The hard-coded stats, recomputed from a 256-bin histogram (cheaper than float pixels).
    counts = torch.bincount(ds.train_images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    assert mean.item() == pytest.approx(data.FASHION_MNIST_MEAN[0], abs=1e-4)
    assert std.item() == pytest.approx(data.FASHION_MNIST_STD[0], abs=1e-4)


# --------------------------------------------------------------------------- downloads


@dataclass
class _Server:
    url: str
    files: dict[str, bytes] = field(default_factory=dict)
    truncate: set[str] = field(default_factory=set)  # send half the body, then hang up
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    """A loopback HTTP server on an ephemeral port, serving ``state.files``."""
    monkeypatch.setenv("no_proxy", "*")  # never route 127.0.0.1 through a configured proxy
    monkeypatch.setenv("NO_PROXY", "*")
    state = _Server(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            state.requests.append(name)
            if name not in state.files:
                self.send_error(404)
                return
            body = state.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in state.truncate:
                body = body[: len(body) // 2]
                self.close_connection = True
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep test output clean
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval keeps shutdown() from stalling each test for half a second.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _tarball_bytes(tmp_path: Path) -> bytes:
    write_cifar(tmp_path / "src", "cifar10", n=40, tarball=True)
    return (tmp_path / "src" / "cifar-10-python.tar.gz").read_bytes()


def _trust(monkeypatch: pytest.MonkeyPatch, name: str, payload: bytes) -> None:
    monkeypatch.setitem(data.CHECKSUMS, name, hashlib.md5(payload).hexdigest())


def test_download_verifies_and_loads(server: _Server, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _tarball_bytes(tmp_path)
    server.files["cifar-10-python.tar.gz"] = payload
    _trust(monkeypatch, "cifar-10-python.tar.gz", payload)
    root = tmp_path / "data"
    assert download_dataset("cifar10", root, base_url=server.url + "/", progress=True) == root
    assert (root / "cifar-10-python.tar.gz").read_bytes() == payload
    assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]  # no .part left
    # A verified file already in place is not fetched again.
    download_dataset("cifar10", root, base_url=server.url, progress=False)
    assert server.requests == ["cifar-10-python.tar.gz"]
    assert load_dataset("cifar10", root).train_images.shape == (200, 3, 32, 32)


def test_load_with_download_fetches_fashion_mnist(server: _Server, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_fashion_mnist(tmp_path / "src", n_train=10, n_test=10)
    for name in arrays:
        server.files[name] = (tmp_path / "src" / name).read_bytes()
        _trust(monkeypatch, name, server.files[name])
    monkeypatch.setattr(data, "FASHION_MNIST_URL", server.url)
    ds = load_dataset("fashion-mnist", tmp_path / "data", download=True)
    assert len(ds.train_labels) == 10
    assert sorted(p.name for p in (tmp_path / "data" / "fashion-mnist").iterdir()) == sorted(arrays)


def test_checksum_mismatch_leaves_no_file(server: _Server, tmp_path: Path) -> None:
    server.files["cifar-10-python.tar.gz"] = b"not the real tarball" * 1000
    root = tmp_path / "data"
    with pytest.raises(DataError, match="MD5"):
        download_dataset("cifar10", root, base_url=server.url, progress=False)
    assert list(root.iterdir()) == []


def test_interrupted_download_leaves_no_file(server: _Server, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _tarball_bytes(tmp_path)
    server.files["cifar-10-python.tar.gz"] = payload
    server.truncate.add("cifar-10-python.tar.gz")
    _trust(monkeypatch, "cifar-10-python.tar.gz", payload)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="cut short|could not download"):
        download_dataset("cifar10", root, base_url=server.url, progress=False)
    assert list(root.iterdir()) == []
    with pytest.raises(DataError, match="not found"):  # and nothing half-written is loaded
        load_dataset("cifar10", root)


def test_http_error_is_a_data_error(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="404"):
        download_dataset("cifar100", tmp_path, base_url=server.url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_download_for_synthetic(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing to download"):
        download_dataset("synthetic", tmp_path)


# --------------------------------------------------------------------------- synthetic, subsets


def test_synthetic_is_deterministic_and_learnable() -> None:
    a = load_dataset("synthetic", seed=3)
    b = load_dataset("synthetic", seed=3)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    c = load_dataset("synthetic", seed=4, num_train=512, num_test=1)
    assert not torch.equal(a.train_images, c.train_images)
    assert a.train_images.shape == (512, 3, 32, 32) and a.test_images.shape == (256, 3, 32, 32)
    assert a.train_images.dtype == torch.uint8 and a.train_labels.dtype == torch.int64
    assert torch.bincount(a.train_labels).tolist() == [52] * 2 + [51] * 8
    assert len(a.mean) == 3 and all(0 < s < 1 for s in a.std)
    # Nearest class mean already separates the classes, so a network can learn them.
    x = a.train_images.float().flatten(1)
    centroids = torch.stack([x[a.train_labels == c].mean(0) for c in range(10)])
    guess = torch.cdist(a.test_images.float().flatten(1), centroids).argmin(1)
    assert (guess == a.test_labels).float().mean() > 0.9


def test_synthetic_options() -> None:
    ds = load_dataset("synthetic", num_train=20, num_test=10, image_size=8, channels=1,
                      num_classes=4)
    assert ds.train_images.shape == (20, 1, 8, 8) and ds.num_classes == 4
    assert ds.image_shape == (1, 8, 8) and "train=20" in repr(ds)
    with pytest.raises(DataError, match="num_train"):
        load_dataset("synthetic", num_train=0)
    with pytest.raises(DataError, match="colour"):
        load_dataset("synthetic", colour=True)
    with pytest.raises(DataError, match="only apply to the synthetic"):
        load_dataset("cifar10", num_train=10)


def test_subset_is_seeded_sized_and_balanced() -> None:
    ds = load_dataset("synthetic", num_train=500, num_test=200)
    small = ds.subset(num_train=95, num_test=30, seed=1)
    assert small.train_images.shape == (95, 3, 32, 32) and len(small.test_labels) == 30
    counts = torch.bincount(small.train_labels, minlength=10)
    assert counts.max() - counts.min() <= 1
    again = ds.subset(num_train=95, num_test=30, seed=1)
    assert torch.equal(small.train_images, again.train_images)
    assert torch.equal(small.test_labels, again.test_labels)
    other = ds.subset(num_train=95, num_test=30, seed=2)
    assert not torch.equal(small.train_images, other.train_images)
    # Picked examples keep their labels, and None keeps a split whole.
    whole_test = ds.subset(num_train=10)
    assert torch.equal(whole_test.test_images, ds.test_images)
    with pytest.raises(DataError, match="cannot take 501"):
        ds.subset(num_train=501)


def test_subset_rows_match_labels() -> None:
    ds = load_dataset("synthetic", num_train=100, num_test=10)
    small = ds.subset(num_train=10, seed=5)
    for image, label in zip(small.train_images, small.train_labels):
        matches = (ds.train_images == image).flatten(1).all(1).nonzero().flatten()
        assert ds.train_labels[matches[0]] == label


# --------------------------------------------------------------------------- odds and ends


def test_unknown_dataset_name() -> None:
    with pytest.raises(DataError, match="choose one of cifar10, cifar100"):
        load_dataset("imagenet")


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIGREG_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("SIGREG_DATA")
    monkeypatch.chdir(tmp_path)
    assert data.default_data_dir() == tmp_path / "data"


def test_image_dataset_validates_and_moves() -> None:
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    labels = torch.zeros(4, dtype=torch.int64)
    ds = ImageDataset("t", images, labels, images, labels, 2, (0.5,), (0.25,))
    assert ds.to("cpu").train_images.device.type == "cpu"
    with pytest.raises(DataError, match="uint8"):
        ImageDataset("t", images.float(), labels, images, labels, 2, (0.5,), (0.25,))
    with pytest.raises(DataError, match="one per channel"):
        ImageDataset("t", images, labels, images, labels, 2, (0.5, 0.5), (0.25,))
