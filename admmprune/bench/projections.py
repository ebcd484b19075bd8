"""The projection suite: the exact top-k and N:M masks against numpy, on one CPU thread.

    admmprune bench --suite projections          # 1e6, 1e7, 1e8 weights, median of 3

Times side by side, interleaved within each repeat, on the same float32
``|w|`` (``w ~ N(0, 1)``, fixed seed) with ``k = n // 10`` at every size:

* ``numpy.argpartition``: the k-th largest ``|w|`` (the threshold only);
* the sort oracle ``projections._topk_mask_sort`` (a stable argsort): only
  up to ``slow_max`` entries (it takes about 75 s at 1e8 on two cores);
* ``projections.topk_mask_flat`` (the radix select), jitted;
* ``jax.lax.top_k`` with the same k, for reference: up to ``slow_max`` too
  (about 6 s at 1e7);
* ``projections.nm_mask`` at 2:4 on a ``(K, 250)`` matrix of about n entries,
  and a numpy reference (``argpartition`` down each block of 4).

Every JAX function is compiled and run once before timing (compile excluded)
and timed to ``block_until_ready``. Each row reports median seconds and the
ratio to numpy. The new masks are checked against the argpartition threshold
(and the oracle, where it runs), so a fast wrong answer cannot pass.

XLA reads its flags once, when its CPU client starts. :func:`run` therefore
sets ``XLA_FLAGS`` to single-threaded XLA (:data:`SINGLE_THREAD_FLAGS`) only
if no JAX backend has been initialised yet in the process, as in a fresh
``admmprune bench --suite projections``; otherwise it leaves the flags alone
and the result says ``"xla_single_thread": false``. numpy's partition is
single-threaded in any case.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
NM_COLUMNS = 250
ENERGY_COSTS = (210.0, 1492.0, 2792.0)  # per-weight energies of three layers
TARGET_RATIO = 2.0


def use_single_thread_xla() -> bool:
    """Adds :data:`SINGLE_THREAD_FLAGS` to ``XLA_FLAGS`` if XLA has not started yet.

    Returns:
        Whether this process's XLA runs single-threaded (flags set now, or
        already present when the backend started).
    """
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if SINGLE_THREAD_FLAGS in flags:
        return True
    if xla_bridge.backends_are_initialized():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_FLAGS}".strip()
    return True


def _median_seconds(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each function, interleaved so load changes hit all alike."""
    import jax

    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _numpy_nm(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M mask in numpy: the ``n`` largest of every ``m`` down each column (argpartition)."""
    rows, cols = scores.shape
    blocks = scores.reshape(rows // m, m, cols)
    keep = np.argpartition(-blocks, n - 1, axis=1)[:, :n, :]
    mask = np.zeros(blocks.shape, bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return mask.reshape(rows, cols)


def measure_size(n: int, repeats: int, slow: bool, seed: int = 0) -> dict[str, Any]:
    """Times every method at one size; returns seconds, ratios and the exactness checks."""
    import jax
    import jax.numpy as jnp

    from admmprune.knapsack import greedy_by_sort, greedy_core
    from admmprune.projections import _topk_mask_sort, nm_mask, topk_mask_flat

    k = n // 10
    w = np.abs(np.random.default_rng(seed).standard_normal(n, dtype=np.float32))
    x = jnp.asarray(w)
    new = jax.jit(lambda s: topk_mask_flat(s, k))
    oracle = jax.jit(lambda s: _topk_mask_sort(s, k))
    top_k = jax.jit(lambda s: jax.lax.top_k(s, k)[1])

    def argpartition() -> np.ndarray:
        return w[np.argpartition(w, n - k)[n - k]]

    # 2:4 on (K, 250), K the largest multiple of 4 with K * 250 <= n (at least one block).
    rows = max(4, (n // NM_COLUMNS) // 4 * 4)
    s = np.abs(np.random.default_rng(seed + 1).standard_normal((rows, NM_COLUMNS), np.float32))
    sj = jnp.asarray(s)
    nm = jax.jit(lambda a: nm_mask(a, 2, 4))

    # The energy knapsack: values w^2, three per-layer costs (integers, so every
    # cost sum is exact and the sort's answer is the exact reference), 10% of
    # the total cost.
    costs = np.random.default_rng(seed + 2).choice(ENERGY_COSTS, n).astype(np.float32)
    capacity = float(np.floor(0.1 * costs.astype(np.float64).sum()))
    with jax.enable_x64(True):
        vj, cj, cap = jnp.asarray(w * w), jnp.asarray(costs), jnp.asarray(capacity, jnp.float64)
    greedy = jax.jit(lambda v, c, C: greedy_core(v, c, C)[0])
    greedy_sort = jax.jit(lambda v, c, C: greedy_by_sort(v, c, C)[0])

    def energy(fn: Callable[..., Any]) -> Callable[[], Any]:
        def call() -> Any:
            with jax.enable_x64(True):
                return fn(vj, cj, cap)

        return call

    fns: dict[str, Callable[[], Any]] = {
        "argpartition": argpartition,
        "topk_mask_flat": lambda: new(x),
        "nm_mask_2_4": lambda: nm(sj),
        "numpy_2_4": lambda: _numpy_nm(s, 2, 4),
        "energy_greedy": energy(greedy),
    }
    if slow:
        fns["sort_oracle"] = lambda: oracle(x)
        fns["lax_top_k"] = lambda: top_k(x)
        fns["energy_greedy_sort"] = energy(greedy_sort)

    # Warm-up (compiles, first-touch allocations) doubles as the exactness check.
    outputs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}
    mask = np.asarray(outputs["topk_mask_flat"])
    threshold = outputs["argpartition"]
    checks = {
        "topk_count_is_k": int(mask.sum()) == k,
        "topk_agrees_with_argpartition": bool(
            np.all(mask[w > threshold]) and not np.any(mask[w < threshold])
        ),
        "nm_equals_numpy": bool(
            np.array_equal(np.asarray(outputs["nm_mask_2_4"]), outputs["numpy_2_4"])
        ),
    }
    energy_mask = np.asarray(outputs["energy_greedy"])
    checks["energy_within_budget"] = bool(costs[energy_mask].sum(dtype=np.float64) <= capacity)
    if slow:
        checks["topk_equals_sort_oracle"] = bool(
            np.array_equal(mask, np.asarray(outputs["sort_oracle"]))
        )
        checks["energy_equals_sort_oracle"] = bool(
            np.array_equal(energy_mask, np.asarray(outputs["energy_greedy_sort"]))
        )
    del outputs, mask, energy_mask
    seconds = _median_seconds(fns, repeats)
    return {
        "n": n,
        "k": k,
        "nm_shape": [rows, NM_COLUMNS],
        "seconds": seconds,
        "topk_ratio": seconds["topk_mask_flat"] / seconds["argpartition"],
        "nm_ratio": seconds["nm_mask_2_4"] / seconds["numpy_2_4"],
        "energy_ratio": seconds["energy_greedy"] / seconds["argpartition"],
        "checks": checks,
    }


def run(
    sizes: Sequence[int] = (10**6, 10**7, 10**8),
    repeats: int = 3,
    quick: bool = False,
    slow_max: int | None = None,
) -> dict[str, Any]:
    """Times top-k and N:M masks against numpy at each size (see the module docstring).

    Args:
        sizes: numbers of float32 weights.
        repeats: timed runs per method (median reported), after one warm-up run.
        quick: time the sort oracle and ``lax.top_k`` only up to 1e7 entries
            (default: at every size; the oracle takes about 75 s at 1e8).
        slow_max: overrides that limit.

    Returns:
        A JSON-ready dict: the results header, ``xla_single_thread``,
        ``xla_flags``, ``slow_max``, one ``rows`` entry per size and the
        ``targets`` (new top-k within 2x of argpartition at each size).
    """
    single = use_single_thread_xla()  # before anything starts XLA
    from admmprune.bench.tables import results_header, target

    started = time.perf_counter()
    limit = slow_max if slow_max is not None else (10**7 if quick else max(sizes))
    rows = [measure_size(n, repeats, slow=n <= limit) for n in sizes]
    targets = [
        target(
            f"{name} within {TARGET_RATIO:g}x of numpy.argpartition at n = {r['n']:,}",
            f"{r[ratio]:.2f}x",
            r[ratio] <= TARGET_RATIO and all(r["checks"].values()),
        )
        for r in rows
        for name, ratio in (("topk_mask_flat", "topk_ratio"), ("energy greedy", "energy_ratio"))
    ]
    header = results_header("admmprune bench --suite projections", quick, started)
    return {
        **header,
        "xla_single_thread": single,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "repeats": repeats,
        "slow_max": limit,
        "rows": rows,
        "targets": targets,
    }


def _cell(seconds: dict[str, float], name: str) -> str:
    return f"{seconds[name]:.3g}" if name in seconds else "skipped"


def table(result: dict[str, Any]) -> str:
    """The markdown table of :func:`run`'s result: median seconds and ratios to numpy."""
    from admmprune.bench.tables import measured_line, targets_table

    threads = "single-threaded" if result["xla_single_thread"] else "multi-threaded"
    lines = [
        "# Projections: exact top-k and N:M masks",
        "",
        measured_line(result),
        f"XLA {threads} (`XLA_FLAGS={result['xla_flags']}`); float32 |w|, w ~ N(0, 1); "
        f"k = n/10; median of {result['repeats']} runs after a warm-up (compile excluded). "
        f"Sort oracle and lax.top_k timed up to n = {result['slow_max']:,} only; "
        f"2:4 masks on a (K, {NM_COLUMNS}) matrix of about n entries.",
        "",
        "| n | numpy.argpartition (s) | sort oracle (s) | topk_mask_flat (s) | "
        "new / argpartition | lax.top_k (s) | nm_mask 2:4 (s) | numpy 2:4 (s) | "
        "nm / numpy | energy greedy (s) | greedy by sort (s) | greedy / argpartition | exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s = r["seconds"]
        lines.append(
            f"| {r['n']:,} | {_cell(s, 'argpartition')} | {_cell(s, 'sort_oracle')} | "
            f"{_cell(s, 'topk_mask_flat')} | {r['topk_ratio']:.2f} | {_cell(s, 'lax_top_k')} | "
            f"{_cell(s, 'nm_mask_2_4')} | {_cell(s, 'numpy_2_4')} | {r['nm_ratio']:.2f} | "
            f"{_cell(s, 'energy_greedy')} | {_cell(s, 'energy_greedy_sort')} | "
            f"{r['energy_ratio']:.2f} | {'yes' if all(r['checks'].values()) else 'NO'} |"
        )
    lines += targets_table(result["targets"])
    return "\n".join(lines) + "\n"


__all__ = ["SINGLE_THREAD_FLAGS", "measure_size", "run", "table", "use_single_thread_xla"]
