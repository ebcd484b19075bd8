"""The 0/1 knapsack behind an energy-constrained projection.

Projecting V onto ``{Z : sum_i c_i [z_i != 0] <= C}`` keeps a subset K of the
entries, and ``||Z - V||^2 = sum_{i not in K} v_i^2``, so the projection is the
knapsack

    maximize  sum_i v_i^2 x_i   subject to   sum_i c_i x_i <= C,  x in {0, 1}^n

(value v_i^2, weight c_i; Yang, Zhu & Liu, ICLR 2019, section 3.2). Two
solvers:

* :func:`greedy_knapsack`: sort by ``v_i^2 / c_i`` and keep the longest
  prefix that fits, as published, then fill the leftover capacity with the
  best-ratio items that still fit. Jit-compiled; the costs are accumulated in
  float64 (on LeNet-5 they sum to about 1e8, beyond float32's exact
  integers, where a float32 running sum could overshoot the budget). Its
  value is within one item of the LP relaxation (Dantzig's bound: the prefix
  plus the fitting fraction of the first item that does not fit), which it
  reports, so every projection comes with a certified optimality gap.
* :func:`exact_knapsack`: a MILP solved by HiGHS through cvxpy, for small
  instances (tests, and users who want the exact projection).

Both return a :class:`KnapsackStats` in projection terms: ``removed`` is the
squared distance ``||Z - V||^2`` of the answer and ``bound`` a lower bound on
the smallest distance any feasible Z achieves.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admmprune.projections import (
    _CHUNK,
    _fold_chunks,
    _key_bits,
    _monotone_key,
    _select,
    _tie_cut,
)


class KnapsackStats(NamedTuple):
    """How good a knapsack answer is, in projection terms (Python floats).

    Attributes:
        removed: ``||Z - V||^2`` of the answer: the value of the dropped items.
        bound: a lower bound on ``||Z - V||^2`` over every feasible Z (the LP
            relaxation for the greedy method; the optimum for an exact solve).
        cost: the answer's total cost, ``sum_i c_i x_i <= capacity``.
        capacity: the capacity C.
        kept: the number of items kept.
    """

    removed: float
    bound: float
    cost: float
    capacity: float
    kept: int

    @property
    def gap(self) -> float:
        """``removed - bound >= 0``: how far the answer can be from optimal."""
        return max(0.0, self.removed - self.bound)

    @property
    def relative_gap(self) -> float:
        """``gap / removed`` (0 when nothing is removed)."""
        return self.gap / self.removed if self.removed > 0 else 0.0


def greedy_core(
    values: jax.Array, costs: jax.Array, capacity: jax.Array, chunk: int = _CHUNK
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The traceable greedy: ``(mask, removed, bound, cost, kept, total)``.

    The answer of :func:`greedy_by_sort` without the sort (the same mask,
    cost and count where cost sums are exact; with other float costs the
    two sum in different orders, so a running cost within rounding of C can
    go either way; for C < 0 nothing fits and the bound is the total, where
    the sort's is meaningless). In the sorted order
    (ratio descending, ties by position) the prefix that fits ends at the
    *break item* b, the first whose running cost passes the capacity; its ratio
    key ``t`` is the largest key whose items at or above it cost more than C,
    found by a cost-weighted radix select (histograms of summed costs over
    16-bit digits of the ratio's monotone key, as the top-k mask does), and b
    is the tie at ``t`` where the running cost of ``C_{>t}`` plus the ties
    before it passes C. Then

        prefix_i = key_i > t  or  (key_i = t and i < b).

    The fill takes, while one fits, the best-ratio item left out that fits
    (the earliest on ties), which is the sorted order's next fitting item.
    O(n) per pass, two passes for float32 ratios. Trace it with float64
    enabled (``jax.enable_x64``) so the cost sums are exact enough;
    :func:`greedy_knapsack` does. ``chunk`` is a parameter only so that tests
    reach the chunked loops on small inputs.
    """
    n = values.shape[0]
    ratio = values / costs.astype(values.dtype)
    bits = _key_bits(ratio.dtype)
    if n == 0:
        zero = jnp.zeros((), jnp.float64)
        return jnp.zeros((0,), bool), zero, zero, zero, jnp.zeros((), jnp.int32), zero
    if bits is None or n >= 2**31:  # int32 positions; non-float ratios
        return greedy_by_sort(values, costs, capacity)
    key = _monotone_key(ratio, bits)
    index = jnp.arange(n, dtype=jnp.int32)

    def sums(mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Float64 sums of the costs and values (where ``mask``), in one chunked pass."""

        def add(
            pieces: tuple[jax.Array, ...], acc: tuple[jax.Array, jax.Array]
        ) -> tuple[jax.Array, jax.Array]:
            c, v, *m = (p.astype(jnp.float64) for p in pieces)
            if m:
                c, v = c * m[0], v * m[0]
            return acc[0] + jnp.sum(c), acc[1] + jnp.sum(v)

        zero = jnp.zeros((), jnp.float64)
        xs = (costs, values) if mask is None else (costs, values, mask)
        return _fold_chunks(xs, add, (zero, zero), chunk)

    total_cost, total = sums(None)

    def with_break() -> tuple[jax.Array, jax.Array]:
        t, above, _ = _select(ratio, capacity, bits, chunk, costs)
        b = _tie_cut(ratio, t, capacity - above, bits, chunk, costs) - 1
        return (key > t) | ((key == t) & (index < b)), b

    def without() -> tuple[jax.Array, jax.Array]:  # everything fits, or nothing can
        return jnp.full((n,), capacity >= 0), jnp.asarray(n, jnp.int32)

    fits_all = (total_cost <= capacity) | (capacity < 0)
    prefix, b = jax.lax.cond(fits_all, without, with_break)
    cost, prefix_value = sums(prefix)
    # Dantzig's LP bound: the break item, in the fraction that fits.
    has_break = b < n
    bi = jnp.minimum(b, n - 1)
    c_b, v_b = costs[bi].astype(jnp.float64), values[bi].astype(jnp.float64)
    lp_value = prefix_value + jnp.where(has_break, (capacity - cost) / c_b * v_b, 0.0)

    # Fill: while some item left out still fits the leftover capacity, add the
    # best-ratio one (the earliest of equal keys; every nonnegative ratio's
    # key is above 0, so a 0 marks "none fits"). One pass
    # per added item; the leftover is below the break item's cost, so at most
    # max(c) / min(c) of them.
    def best_fit(keep: jax.Array, cost: jax.Array) -> tuple[jax.Array, jax.Array]:
        fit = jnp.where(~keep & (costs <= capacity - cost), key, 0)
        # max, then the first index holding it: two plain reductions, which XLA
        # vectorizes (its variadic argmax reduction is several times slower).
        best = jnp.max(fit)
        i = jnp.min(jnp.where(fit == best, index, n))
        return jnp.minimum(i, n - 1), best > 0

    def fill_body(carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        keep, cost, value, i, _ = carry
        keep = keep.at[i].set(True)
        cost, value = cost + costs[i].astype(jnp.float64), value + values[i].astype(jnp.float64)
        return keep, cost, value, *best_fit(keep, cost)

    keep, cost, kept_value, _, _ = jax.lax.while_loop(
        lambda carry: carry[4], fill_body, (prefix, cost, prefix_value, *best_fit(prefix, cost))
    )
    return keep, total - kept_value, total - lp_value, cost, jnp.sum(keep), total


def greedy_by_sort(
    values: jax.Array, costs: jax.Array, capacity: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`greedy_core` by a stable sort: O(n log n), the reference it matches.

    Kept as the oracle for tests and the projection benchmark.
    """
    n = values.shape[0]
    ratio = values / costs.astype(values.dtype)
    # Stable: equal ratios keep their input order, so the answer is deterministic.
    order = jnp.argsort(-ratio, stable=True)
    c_sorted = costs[order].astype(jnp.float64)
    v_sorted = values[order].astype(jnp.float64)
    cum = jnp.cumsum(c_sorted)
    prefix = cum <= capacity  # costs > 0, so ``cum`` increases and this is a prefix
    count = jnp.sum(prefix)
    cost = jnp.where(count > 0, cum[jnp.maximum(count - 1, 0)], 0.0)
    nxt = jnp.minimum(count, n - 1)
    fraction = jnp.where(count < n, (capacity - cost) / c_sorted[nxt], 0.0)
    lp_value = jnp.sum(jnp.where(prefix, v_sorted, 0.0)) + fraction * v_sorted[nxt]

    def fill_cond(carry: tuple[jax.Array, jax.Array]) -> jax.Array:
        keep, cost = carry
        return jnp.any(~keep & (c_sorted <= capacity - cost))

    def fill_body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        keep, cost = carry
        i = jnp.argmax(~keep & (c_sorted <= capacity - cost))
        return keep.at[i].set(True), cost + c_sorted[i]

    keep, cost = jax.lax.while_loop(fill_cond, fill_body, (prefix, cost))
    kept_value = jnp.sum(jnp.where(keep, v_sorted, 0.0))
    mask = jnp.zeros((n,), bool).at[order].set(keep)
    total = jnp.sum(values.astype(jnp.float64))
    return mask, total - kept_value, total - lp_value, cost, jnp.sum(keep), total


_greedy = jax.jit(greedy_core, static_argnames=("chunk",))


def greedy_knapsack(
    values: jax.Array, costs: jax.Array, capacity: float
) -> tuple[jax.Array, KnapsackStats]:
    """Greedy knapsack by value/cost ratio, with its LP-relaxation bound.

    Items are sorted by ``values / costs`` (descending, ties by position),
    the longest prefix whose total cost fits in ``capacity`` is kept, and
    the leftover capacity is filled with the best-ratio items that still fit
    (one at a time, at most ``max(c) / min(c)`` vectorized passes). The
    answer never exceeds ``capacity``; its dropped value is at most the LP
    bound plus one item's value (Dantzig, 1957).

    Args:
        values: 1-D nonnegative item values (``v_i^2`` for a projection).
        costs: 1-D positive item costs, the shape of ``values``.
        capacity: the budget C (negative: nothing fits).

    Returns:
        The boolean keep-mask and its :class:`KnapsackStats`.
    """
    values = jnp.asarray(values)
    costs = jnp.asarray(costs)
    if values.ndim != 1 or values.shape != costs.shape:
        raise ValueError(
            f"values and costs must be 1-D of one shape, got {values.shape} and {costs.shape}."
        )
    with jax.enable_x64(True):
        mask, removed, bound, cost, kept, _ = _greedy(
            values, costs, jnp.asarray(capacity, jnp.float64)
        )
        stats = KnapsackStats(float(removed), float(bound), float(cost), float(capacity), int(kept))
    return mask, stats


@contextlib.contextmanager
def quiet_native_stdout() -> Iterator[None]:
    """Silences what native code writes to the process's stdout (HiGHS prints its
    banner there from C++, past ``sys.stdout``, whatever cvxpy's ``verbose`` says),
    so a command's own output (``--json``) stays clean."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def exact_knapsack(
    values: np.ndarray,
    costs: np.ndarray,
    capacity: float,
    *,
    time_limit: float = 30.0,
) -> tuple[np.ndarray, KnapsackStats]:
    """The exact knapsack, as a MILP solved by HiGHS (through cvxpy).

    For small instances (thousands of items); the MILP is solved to a zero
    relative gap. Raises ``RuntimeError`` when HiGHS does not prove
    optimality within ``time_limit`` seconds (use :func:`greedy_knapsack`,
    whose bound says how far from optimal it is).

    Returns:
        The boolean keep-mask and its :class:`KnapsackStats` (``bound`` is the
        optimum itself, so ``gap`` is 0).
    """
    import cvxpy as cp

    v = np.asarray(values, np.float64).ravel()
    c = np.asarray(costs, np.float64).ravel()
    if v.shape != c.shape:
        raise ValueError(f"values and costs differ in shape: {v.shape} vs {c.shape}.")
    total = float(v.sum())
    if capacity < 0 or v.size == 0:
        return np.zeros(v.shape, bool), KnapsackStats(total, total, 0.0, float(capacity), 0)
    x = cp.Variable(v.size, boolean=True)
    prob = cp.Problem(cp.Maximize(v @ x), [c @ x <= capacity])
    with quiet_native_stdout():
        prob.solve(solver=cp.HIGHS, time_limit=float(time_limit), mip_rel_gap=0.0)
    if prob.status != cp.OPTIMAL or x.value is None:
        raise RuntimeError(
            f"HiGHS did not prove the knapsack optimal within {time_limit} s "
            f"(status {prob.status}, {v.size} items); raise time_limit or use the greedy method."
        )
    mask = np.asarray(x.value) > 0.5
    cost = float(c[mask].sum())
    if cost > capacity:  # a solver tolerance must not let the budget be exceeded
        raise RuntimeError(f"HiGHS returned cost {cost} above capacity {capacity}.")
    removed = total - float(v[mask].sum())
    return mask, KnapsackStats(removed, removed, cost, float(capacity), int(mask.sum()))


__all__ = ["KnapsackStats", "exact_knapsack", "greedy_knapsack"]
