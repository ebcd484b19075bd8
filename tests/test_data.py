"""The MNIST loader: hash check, CSV-in-wheel parsing, IDX files, clear errors."""

from __future__ import annotations

import gzip
import hashlib
import struct
import zipfile

import numpy as np
import pytest

from admmprune import data as md


def _csv(labels: np.ndarray, pixels: np.ndarray) -> bytes:
    header = "label," + ",".join(f"p{i}" for i in range(784))
    rows = [",".join(map(str, [int(lab), *px])) for lab, px in zip(labels, pixels, strict=True)]
    return ("\n".join([header, *rows]) + "\n").encode()


def _fake_wheel(path, n_train=6, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    with zipfile.ZipFile(path, "w") as z:
        for split, n in (("train", n_train), ("test", n_test)):
            y = rng.integers(0, 10, n)
            x = rng.integers(0, 256, (n, 784))
            z.writestr(md._CSV_MEMBERS[split], _csv(y, x))
            arrays[split] = (x.reshape(n, 28, 28), y)
    return arrays, hashlib.sha256(path.read_bytes()).hexdigest()


def test_wheel_csvs_are_parsed_exactly(tmp_path):
    wheel = tmp_path / "fake.whl"
    expected, sha = _fake_wheel(wheel)
    got = md.read_wheel(wheel, expected_sha256=sha)
    for split in ("train", "test"):
        np.testing.assert_array_equal(got[f"{split}_x"], expected[split][0])
        np.testing.assert_array_equal(got[f"{split}_y"], expected[split][1])
        assert got[f"{split}_x"].dtype == np.uint8


def test_hash_check_rejects_a_corrupted_wheel(tmp_path):
    wheel = tmp_path / "fake.whl"
    _, sha = _fake_wheel(wheel)
    raw = bytearray(wheel.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    wheel.write_bytes(bytes(raw))
    with pytest.raises(md.DataError, match="corrupted"):
        md.read_wheel(wheel, expected_sha256=sha)


def test_the_pinned_hash_rejects_anything_else(tmp_path):
    wheel = tmp_path / md.MNIST_WHEEL
    _fake_wheel(wheel)
    with pytest.raises(md.DataError, match=md.MNIST_WHEEL_SHA256):
        md.read_wheel(wheel)


def test_malformed_csv_is_rejected(tmp_path):
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(md._CSV_MEMBERS["train"], b"label,a,b\n1,2,3\n")
        z.writestr(md._CSV_MEMBERS["test"], b"label,a,b\n1,2,3\n")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(md.DataError, match="785 columns"):
        md.read_wheel(wheel, expected_sha256=sha)


def _write_idx(path, array: np.ndarray, gz: bool = True):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_idx_files_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, 5).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=False)
    np.testing.assert_array_equal(md.read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    np.testing.assert_array_equal(md.read_idx(tmp_path / "train-labels-idx1-ubyte"), labels)


def test_idx_directory_with_wrong_sizes_or_files_is_rejected(tmp_path):
    small = np.zeros((5, 28, 28), np.uint8)
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        _write_idx(tmp_path / f"{stem}.gz", small)
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        _write_idx(tmp_path / f"{stem}.gz", np.zeros(5, np.uint8))
    with pytest.raises(md.DataError, match="60000 train images"):
        md.load_mnist(idx_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(md.DataError, match=r"no t10k-labels-idx1-ubyte\.gz"):
        md.load_mnist(idx_dir=tmp_path)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(md.DataError, match="unsigned-byte IDX"):
        md.read_idx(tmp_path / "bad")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("ADMMPRUNE_MNIST_IDX", raising=False)
    with pytest.raises(md.DataError, match=r"python -m admmprune.data fetch"):
        md.load_mnist(directory=tmp_path / "empty")


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMMPRUNE_DATA_DIR", str(tmp_path))
    assert md.cache_dir() == tmp_path
    monkeypatch.delenv("ADMMPRUNE_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert md.cache_dir() == tmp_path / "xdg" / "admmprune"


def test_corrupted_cache_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("ADMMPRUNE_MNIST_IDX", raising=False)
    (tmp_path / "mnist.npz").write_bytes(b"not a zip")
    with pytest.raises(md.DataError, match="unreadable"):
        md.load_mnist(directory=tmp_path)


def test_synthetic_sets_are_deterministic():
    a = md.synthetic_classification(64, dim=8, classes=3, seed=5)
    b = md.synthetic_classification(64, dim=8, classes=3, seed=5)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert set(np.unique(a.y)) <= {0, 1, 2}
    img = md.synthetic_classification(4, image=True)
    assert img.x.shape == (4, 28, 28, 1) and img.x.dtype == np.float32
