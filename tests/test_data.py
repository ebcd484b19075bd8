"""The MNIST loader: hash check, CSV-in-wheel parsing, IDX files, clear errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
import subprocess
import tarfile
import zipfile
from pathlib import Path

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


# --- Fashion-MNIST -----------------------------------------------------------------------------
#
# A tiny synthetic Fashion-MNIST (6 train / 3 test images) stands in for the real one: the test
# builds its IDX files, the .gz files each source would serve and a .deb around them by hand
# (ar archive + data.tar.xz at the package's real paths), and pins their hashes in place of the
# real ones. No test downloads anything: apt-get and HTTP are replaced for every test here.

_STEMS = list(md._IDX_FILES.values())
_TINY = {"train": 6, "test": 3}


def _idx(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim  # 0x00000801 labels, 0x00000803 images
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, content in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += [header.encode(), data, b"\n" * (len(data) % 2)]
    return b"".join(out)


def _deb(data_files: dict[str, bytes], marker: Path, data_name: str = "data.tar.xz") -> bytes:
    control = {
        "./control": b"Package: dataset-fashion-mnist\n",
        "./postinst": f"#!/bin/sh\ntouch {marker}\n".encode(),  # must never run
    }
    data = data_files if data_name == "data.tar.xz" else None
    payload = _tar_xz(data) if data is not None else b"\x28\xb5\x2f\xfd not really zstd"
    return _ar(
        [("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz(control)), (data_name, payload)]
    )


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


class _Fashion:
    """The tiny set, its files as each source serves them, and the hashes pinned for it."""

    def __init__(self, root: Path, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.arrays, self.raw, self.deb_gz, self.zalando_gz = {}, {}, {}, {}
        for key, stem in md._IDX_FILES.items():
            n = _TINY[key.split("_")[0]]
            shape = (n, 28, 28) if key.endswith("_x") else (n,)
            array = rng.integers(0, 256 if key.endswith("_x") else 10, shape).astype(np.uint8)
            self.arrays[key], self.raw[stem] = array, _idx(array)
            # Like the real sources: the same IDX bytes, gzipped differently.
            self.deb_gz[stem] = gzip.compress(self.raw[stem], mtime=1591347949)
            self.zalando_gz[stem] = gzip.compress(self.raw[stem], compresslevel=6, mtime=0)
        self.marker = root / "postinst-ran"
        files = {f"./{md.FASHION_MNIST_DEB_DIR}/{s}.gz": gz for s, gz in self.deb_gz.items()}
        files["./usr/share/doc/dataset-fashion-mnist/copyright"] = b"MIT\n"
        self.deb = _deb(files, self.marker)

    def pin(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(md, "_SIZES", dict(_TINY))
        monkeypatch.setattr(
            md, "FASHION_MNIST_IDX_SHA256", {s: _sha(r) for s, r in self.raw.items()}
        )
        monkeypatch.setattr(
            md, "FASHION_MNIST_DEB_GZ_SHA256", {s: _sha(g) for s, g in self.deb_gz.items()}
        )
        monkeypatch.setattr(
            md, "FASHION_MNIST_ZALANDO_GZ_SHA256", {s: _sha(g) for s, g in self.zalando_gz.items()}
        )
        monkeypatch.setattr(md, "FASHION_MNIST_DEB_SHA256", _sha(self.deb))

    def check(self, data: md.MNIST) -> None:
        """Normalized exactly as MNIST: float32 (N, 28, 28, 1) = uint8 / 255, int32 labels."""
        for split in ("train", "test"):
            s = getattr(data, split)
            assert s.x.dtype == np.float32 and s.y.dtype == np.int32
            assert s.x.shape == (_TINY[split], 28, 28, 1)
            np.testing.assert_array_equal(s.x[..., 0] * 255.0, self.arrays[f"{split}_x"])
            np.testing.assert_array_equal(s.y, self.arrays[f"{split}_y"])


_REAL_APT_GET_DOWNLOAD = md._apt_get_download


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No apt-get, no HTTP, no installed package, a private cache: nothing leaves the test."""

    def no_apt(spec, into):
        raise md.DataError("apt-get is disabled in tests")

    def no_http(url):
        raise md.DataError(f"HTTP is disabled in tests ({url})")

    monkeypatch.setattr(md, "_apt_get_download", no_apt)
    monkeypatch.setattr(md, "_http_get", no_http)
    monkeypatch.setattr(md, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.setenv("ADMMPRUNE_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADMMPRUNE_FASHION_MNIST_IDX", raising=False)


@pytest.fixture
def fashion(tmp_path, monkeypatch) -> _Fashion:
    f = _Fashion(tmp_path)
    f.pin(monkeypatch)
    return f


def _serve_deb(monkeypatch, deb: bytes) -> list[tuple[list[str], Path]]:
    """The real ``_apt_get_download`` over a fake ``subprocess.run`` that writes ``deb``."""
    calls: list[tuple[list[str], Path]] = []

    def run(cmd, *, cwd, **kwargs):
        calls.append((list(cmd), Path(cwd)))
        (Path(cwd) / f"dataset-fashion-mnist_{md.FASHION_MNIST_DEB_VERSION}_all.deb").write_bytes(
            deb
        )
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(md, "_apt_get_download", _REAL_APT_GET_DOWNLOAD)
    monkeypatch.setattr(md.subprocess, "run", run)
    return calls


def _cached(directory: Path) -> list[str]:
    return (
        sorted(p.name for p in (directory / "fashion-mnist").glob("*"))
        if directory.exists()
        else []
    )


def test_ar_reader_reads_members_and_odd_padding(tmp_path):
    members = [("debian-binary", b"2.0\n"), ("odd", b"xyz"), ("after.odd/", b"12")]
    raw = _ar(members)
    assert md.read_ar(raw) == {"debian-binary": b"2.0\n", "odd": b"xyz", "after.odd": b"12"}
    if shutil.which("ar"):  # an independent reader agrees on the test's archive
        (tmp_path / "a.ar").write_bytes(raw)
        got = subprocess.run(["ar", "p", str(tmp_path / "a.ar"), "odd"], capture_output=True)
        assert got.stdout == b"xyz"
    with pytest.raises(md.DataError, match="not an ar archive"):
        md.read_ar(b"PK\x03\x04")
    with pytest.raises(md.DataError, match="runs past the end"):
        md.read_ar(raw[:-1])


def test_deb_is_unpacked_in_memory_and_runs_nothing(fashion, tmp_path):
    deb = tmp_path / "fm.deb"
    deb.write_bytes(fashion.deb)
    before = sorted(tmp_path.rglob("*"))
    assert md.read_fashion_mnist_deb(deb) == fashion.deb_gz
    assert not fashion.marker.exists()
    assert sorted(tmp_path.rglob("*")) == before  # nothing extracted to disk


def test_a_zstd_deb_is_refused_with_a_clear_message(fashion, tmp_path, monkeypatch):
    deb = tmp_path / "fm.deb"
    deb.write_bytes(_deb({}, fashion.marker, data_name="data.tar.zst"))
    monkeypatch.setattr(md, "FASHION_MNIST_DEB_SHA256", _sha(deb.read_bytes()))
    with pytest.raises(md.DataError, match=r"data\.tar\.zst .*zstd"):
        md.read_fashion_mnist_deb(deb)


def test_apt_fetch_is_verified_cached_once_then_loaded(fashion, tmp_path, monkeypatch):
    calls = _serve_deb(monkeypatch, fashion.deb)
    cache = tmp_path / "cache"
    fashion.check(md.load_fashion_mnist(directory=cache))
    spec = f"dataset-fashion-mnist={md.FASHION_MNIST_DEB_VERSION}"
    assert [c[0] for c in calls] == [["apt-get", "-q", "download", spec]]
    assert not calls[0][1].exists()  # the temporary directory is gone, .deb and all
    assert _cached(cache) == sorted(f"{s}.gz" for s in _STEMS)
    for stem in _STEMS:
        assert (cache / "fashion-mnist" / f"{stem}.gz").read_bytes() == fashion.deb_gz[stem]
    monkeypatch.setattr(md, "_apt_get_download", None)  # a second load must not fetch
    fashion.check(md.load_fashion_mnist(directory=cache, download=False))
    assert len(calls) == 1 and not fashion.marker.exists()


@pytest.mark.parametrize("tamper", ["deb", "member"])
def test_a_tampered_deb_is_refused_and_nothing_is_cached(fashion, tmp_path, monkeypatch, tamper):
    if tamper == "deb":
        deb = bytearray(fashion.deb)
        deb[len(deb) // 2] ^= 0xFF
        deb, match = bytes(deb), "not the pinned dataset-fashion-mnist"
    else:  # a well-formed, re-pinned .deb whose test labels are not the pinned ones
        files = {f"./{md.FASHION_MNIST_DEB_DIR}/{s}.gz": g for s, g in fashion.deb_gz.items()}
        labels = np.zeros(3, np.uint8)
        files[f"./{md.FASHION_MNIST_DEB_DIR}/t10k-labels-idx1-ubyte.gz"] = gzip.compress(
            _idx(labels)
        )
        deb, match = _deb(files, fashion.marker), r"t10k-labels-idx1-ubyte\.gz has SHA-256"
        monkeypatch.setattr(md, "FASHION_MNIST_DEB_SHA256", _sha(deb))
    _serve_deb(monkeypatch, deb)
    with pytest.raises(md.DataError, match=match) as e:
        md.load_fashion_mnist(directory=tmp_path / "cache")
    assert "corrupted" in str(e.value) and "HTTP is disabled" in str(e.value)
    assert _cached(tmp_path / "cache") == []


def test_zalando_urls_when_apt_fails_each_file_hash_checked(fashion, tmp_path, monkeypatch):
    served = dict(fashion.zalando_gz)

    def http_get(url):
        assert url.startswith(md.FASHION_MNIST_URL) and url.endswith(".gz")
        return served[url.removeprefix(md.FASHION_MNIST_URL).removesuffix(".gz")]

    monkeypatch.setattr(md, "_http_get", http_get)
    served["train-images-idx3-ubyte"] = fashion.deb_gz["train-images-idx3-ubyte"]  # wrong file
    with pytest.raises(md.DataError, match=r"train-images-idx3-ubyte\.gz has SHA-256") as e:
        md.load_fashion_mnist(directory=tmp_path / "cache")
    assert "apt-get is disabled" in str(e.value)
    assert _cached(tmp_path / "cache") == []
    served["train-images-idx3-ubyte"] = fashion.zalando_gz["train-images-idx3-ubyte"]
    fashion.check(md.load_fashion_mnist(directory=tmp_path / "cache"))
    cached = tmp_path / "cache" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    assert cached.read_bytes() == fashion.zalando_gz["train-images-idx3-ubyte"]


def test_a_corrupted_cache_is_refused_and_a_fetch_repairs_it(fashion, tmp_path, monkeypatch):
    _serve_deb(monkeypatch, fashion.deb)
    cache = tmp_path / "cache"
    md.fetch_fashion_mnist(cache)
    other = gzip.compress(_idx(np.full(6, 3, np.uint8)))  # valid gzip, valid IDX, wrong data
    (cache / "fashion-mnist" / "train-labels-idx1-ubyte.gz").write_bytes(other)
    with pytest.raises(md.DataError, match=r"\(uncompressed\) has SHA-256.*fetch-data --dataset"):
        md.load_fashion_mnist(directory=cache)
    assert md.fetch_fashion_mnist(cache) == cache / "fashion-mnist"
    fashion.check(md.load_fashion_mnist(directory=cache, download=False))


def test_the_installed_package_is_read_in_place(fashion, tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    system.mkdir()
    for stem, gz in fashion.deb_gz.items():
        (system / f"{stem}.gz").write_bytes(gz)
    monkeypatch.setattr(md, "FASHION_MNIST_SYSTEM_DIR", system)
    fashion.check(md.load_fashion_mnist(directory=tmp_path / "cache", download=False))
    assert _cached(tmp_path / "cache") == []
    (system / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00" * 64))
    with pytest.raises(md.DataError, match="apt install --reinstall dataset-fashion-mnist"):
        md.load_fashion_mnist(directory=tmp_path / "cache", download=False)


def test_a_users_idx_dir_is_checked_for_format_not_hash(tmp_path, monkeypatch):
    f = _Fashion(tmp_path)  # the real pins stay: the user's copy does not match them
    monkeypatch.setattr(md, "_SIZES", dict(_TINY))
    user = tmp_path / "mine"
    user.mkdir()
    for stem, raw in f.raw.items():  # mixed: raw train files, gzipped test files
        if stem.startswith("train"):
            (user / stem).write_bytes(raw)
        else:
            (user / f"{stem}.gz").write_bytes(gzip.compress(raw))
    f.check(md.load_fashion_mnist(idx_dir=user, download=False))
    monkeypatch.setenv("ADMMPRUNE_FASHION_MNIST_IDX", str(user))
    f.check(md.load_fashion_mnist(download=False))
    (user / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros((6, 28, 28), np.uint8)))
    with pytest.raises(md.DataError, match="Fashion-MNIST's 6 train images"):
        md.load_fashion_mnist(idx_dir=user)
    (user / "train-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x0d\x01" + struct.pack(">I", 6) + b"\x00" * 24
    )
    with pytest.raises(md.DataError, match="unsigned-byte IDX"):
        md.load_fashion_mnist(idx_dir=user)
    (user / "train-labels-idx1-ubyte").write_bytes(_idx(np.full(6, 10, np.uint8)))
    with pytest.raises(md.DataError, match=r"labels must be 0\.\.9"):
        md.load_fashion_mnist(idx_dir=user)
    (user / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(md.DataError, match=r"no train-labels-idx1-ubyte\.gz"):
        md.load_fashion_mnist(idx_dir=user)


@pytest.mark.parametrize("download", [False, True])
def test_unavailable_fashion_mnist_names_every_fix(tmp_path, download):
    with pytest.raises(md.DataError) as e:
        md.load_fashion_mnist(directory=tmp_path / "cache", download=download)
    message = str(e.value)
    for fix in (
        "apt install dataset-fashion-mnist",
        "idx_dir=",
        "admmprune fetch-data --dataset fashion-mnist",
    ):
        assert fix in message
    if download:  # what each source answered
        assert "apt-get is disabled" in message and "HTTP is disabled" in message
    assert _cached(tmp_path / "cache") == []


def test_fetch_data_command_fetches_fashion_mnist(fashion, tmp_path, monkeypatch, capsys):
    from admmprune import cli

    assert cli.build_parser().parse_args(["fetch-data"]).dataset == "mnist"
    assert cli.main(["fetch-data", "--dataset", "fashion-mnist", "--dir", str(tmp_path / "a")]) == 2
    assert "apt install dataset-fashion-mnist" in capsys.readouterr().err
    _serve_deb(monkeypatch, fashion.deb)
    assert cli.main(["fetch-data", "--dataset", "fashion-mnist", "--dir", str(tmp_path / "b")]) == 0
    assert "Fashion-MNIST verified and cached at" in capsys.readouterr().out
    assert _cached(tmp_path / "b") == sorted(f"{s}.gz" for s in _STEMS)
    assert md.main(["fetch", "--dataset", "fashion-mnist", "--dir", str(tmp_path / "b")]) == 0


def test_the_pinned_fashion_mnist_hashes_are_well_formed():
    pins = (
        md.FASHION_MNIST_IDX_SHA256,
        md.FASHION_MNIST_DEB_GZ_SHA256,
        md.FASHION_MNIST_ZALANDO_GZ_SHA256,
    )
    for table in pins:
        assert sorted(table) == sorted(_STEMS)
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in table.values())
    # Debian re-gzipped Zalando's files: same IDX bytes, different .gz files.
    assert set(md.FASHION_MNIST_DEB_GZ_SHA256.values()).isdisjoint(
        md.FASHION_MNIST_ZALANDO_GZ_SHA256.values()
    )
    assert len(md.FASHION_MNIST_DEB_SHA256) == 64
