"""Shared test settings: hypothesis without deadlines (first calls compile); compiled
code freed after each test module."""

import gc
import os
import platform
from collections.abc import Iterator
from pathlib import Path

# Pins OpenBLAS's kernels before numpy and scipy load it. jax's CPU LAPACK calls
# (the Cholesky factorizations of OBS) go through scipy's OpenBLAS, which picks its
# kernels by CPU model at load time, so float64 results -- and a golden hash of
# them -- otherwise differ between CPUs in their last bits. Haswell's kernels run on
# any x86-64 CPU with AVX2 (elsewhere the pin would fault or be ignored, so it is
# set only there); tests/test_golden.py checks that the pin took effect.
_CPUINFO = Path("/proc/cpuinfo")
if (
    platform.machine().lower() in ("x86_64", "amd64")
    and _CPUINFO.exists()
    and " avx2" in _CPUINFO.read_text()
):
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")

import jax  # noqa: E402 (after the pin)
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "admmprune",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("admmprune")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_code() -> Iterator[None]:
    """Drops JAX's compilation caches after each test module.

    Every XLA:CPU executable holds a few memory mappings of JIT code; the whole
    suite compiles thousands of them in one process and, kept alive by the jit
    caches, they pass Linux's default ``vm.max_map_count`` (65530), after which
    the next compile segfaults inside XLA. Tests share no compiled state across
    modules, so clearing costs only recompiles.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def checkpoint_at(tmp_path):
    """``checkpoint_at(n) -> (on_iteration, saved)``: an ``ADMM.run`` hook that saves the
    state after iteration ``n`` to ``saved["path"]`` and its history to ``saved["history"]``."""
    from admmprune import save_checkpoint

    def make(n):
        saved = {"path": tmp_path / "admm.npz"}

        def on_iteration(state, history):
            if int(state.iteration) == n:
                save_checkpoint(saved["path"], state)
                saved["history"] = list(history)

        return on_iteration, saved

    return make
