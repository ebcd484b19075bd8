"""Euclidean projections of a parameter pytree onto sparsity sets.

Every set here keeps a subset of entries and zeros the rest, so a projection is
a mask followed by :func:`apply_masks`. For a cardinality constraint the
projection is exact and closed-form:

    Proj_{||z||_0 <= k}(v) = argmin_{||z||_0 <= k} ||z - v||^2
                           = v restricted to its k largest |v_i|,

because ``||z - v||^2 = sum_{i not kept} v_i^2`` is smallest when the dropped
entries are the smallest in magnitude (Zhang et al., ECCV 2018, eq. 8). An N:M
set (every block of M consecutive weights keeps N) is a product of disjoint
cardinality sets, so its projection is the same rule block by block.

The top-k mask is a radix select, not a sort: each score is mapped to an
unsigned integer key whose order is the score order (:func:`_monotone_key`),
two histogram passes over 16-bit digits of the key find the k-th largest key
``t`` exactly, and the mask is ``key > t`` plus the earliest entries with
``key == t``. That is O(n) work in a fixed number of passes, jit-safe with
static shapes, and gives the same mask, bit for bit, as a stable sort
(:func:`_topk_mask_sort`, kept as the oracle).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, apply_masks, scatter_flat


class _Group(Protocol):
    leaves: tuple[int, ...]
    k: int


# ------------------------------------------------------------ monotone keys
# (float dtype to bitcast through, unsigned key dtype, smallest normal, +inf), by key width.
_KEY_FORMATS = {
    32: (jnp.float32, jnp.uint32, 0x0080_0000, 0x7F80_0000),
    64: (jnp.float64, jnp.uint64, 0x0010_0000_0000_0000, 0x7FF0_0000_0000_0000),
}
_DIGIT = 16  # bits per radix pass: 2**16 bins
_CHUNK = 1 << 16  # entries per histogram step (stays in cache)
_SPREAD = 64  # "not in this bin" counters, so out-of-bin entries do not all hit one address


def _key_bits(dtype: Any) -> int | None:
    """Width of the monotone key for ``dtype`` (None: not a float type)."""
    if not jnp.issubdtype(dtype, jnp.floating):
        return None
    return 64 if jnp.finfo(dtype).bits == 64 else 32


def _monotone_key(x: jax.Array, bits: int) -> jax.Array:
    """Unsigned integer keys whose order is the order a stable sort gives ``x``.

    For an IEEE float with bit pattern ``b`` and sign bit ``s``:

        key(x) = ~b              if s = 1   (negative: larger magnitude, smaller key)
                 b | 2^(bits-1)  if s = 0

    so ``x < y  <=>  key(x) < key(y)`` on the ordered floats. Then, to rank
    exactly as ``jnp.argsort`` does on XLA:CPU: ``+0``, ``-0`` and every
    subnormal get the key of ``+0`` (XLA:CPU flushes subnormals to zero, so
    they tie with zero), and every NaN gets key 0, below ``-inf``.
    float16 and bfloat16 are widened to float32 first (exact; an f16
    subnormal becomes a normal f32, as it does inside XLA's sort).
    """
    fdt, udt, tiny, inf = _KEY_FORMATS[bits]
    b = jax.lax.bitcast_convert_type(x.astype(fdt), udt)
    sign = udt(1 << (bits - 1))
    magnitude = b & udt((1 << (bits - 1)) - 1)
    key = jnp.where(b >= sign, ~b, b | sign)
    key = jnp.where(magnitude < udt(tiny), sign, key)
    return jnp.where(magnitude > udt(inf), udt(0), key)


# ------------------------------------------------------------- radix select
def _fold_chunks(xs: tuple[jax.Array, ...], fn: Any, init: Any, chunk: int) -> Any:
    """``fn(pieces, acc)`` folded over the arrays ``xs`` (one length) in
    ``chunk``-sized pieces, then the tail.

    A loop over cache-sized chunks, because XLA:CPU does not fuse an
    elementwise producer into a scatter or a reduction: over the whole array
    it would write an n-sized intermediate first.
    """
    n = xs[0].shape[0]
    full = n // chunk
    acc = init
    if full == 1:
        acc = fn(tuple(x[:chunk] for x in xs), acc)
    elif full > 1:

        def body(i: jax.Array, a: Any) -> Any:
            return fn(tuple(jax.lax.dynamic_slice(x, (i * chunk,), (chunk,)) for x in xs), a)

        acc = jax.lax.fori_loop(0, full, body, acc)
    if n > full * chunk:
        acc = fn(tuple(x[full * chunk :] for x in xs), acc)
    return acc


def _sum_dtype(weights: jax.Array | None) -> Any:
    """Counts add up in int32; weights in float64 (trace with ``jax.enable_x64``)."""
    return jnp.int32 if weights is None else jnp.float64


def _digit_histogram(
    x: jax.Array,
    bits: int,
    shift: int,
    prefix: jax.Array,
    chunk: int,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Counts (or summed ``weights``) of the digit ``(key >> shift) & (2^16 - 1)``
    over the keys whose higher bits equal ``prefix``:
    ``h[d] = sum {w_i : key_i >> shift = prefix * 2^16 + d}`` (``w_i = 1`` for counts)."""
    udt = _KEY_FORMATS[bits][1]
    nbins = 1 << _DIGIT
    top = shift + _DIGIT == bits  # the first digit: every key is in range

    def step(pieces: tuple[jax.Array, ...], acc: jax.Array) -> jax.Array:
        piece = pieces[0]
        d = (_monotone_key(piece, bits) >> udt(shift)) - (prefix << udt(_DIGIT))
        if not top:
            spread = udt(nbins) + (jnp.arange(piece.shape[0], dtype=udt) & udt(_SPREAD - 1))
            d = jnp.where(d < udt(nbins), d, spread)
        add = 1 if weights is None else pieces[1].astype(acc.dtype)
        return acc.at[d.astype(jnp.int32)].add(add, mode="promise_in_bounds")

    size = nbins + (0 if top else _SPREAD)
    dtype = _sum_dtype(weights)
    xs = (x,) if weights is None else (x, weights)
    return _fold_chunks(xs, step, jnp.zeros((size,), dtype), chunk)[:nbins]


def _locate(h: jax.Array, limit: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The bin where the suffix sums of a histogram ``h`` first exceed ``limit``.

    Returns ``(j, above, h[j])`` with ``j = max{j : sum_{i >= j} h_i > limit}``
    and ``above = sum_{i > j} h_i``, so ``above <= limit < above + h_j``: for
    counts and ``limit = r - 1`` the bin of the ``r``-th largest entry. A
    2^16-bin histogram is searched as 256 rows of 256.
    """
    size = h.shape[0]
    if size > 256:
        width = size // 256
        rows = h.reshape(256, width)
        jr, above_r, _ = _locate(rows.sum(axis=1, dtype=h.dtype), limit)
        row = jax.lax.dynamic_index_in_dim(rows, jr, 0, keepdims=False)
        jc, above_c, hj = _locate(row, limit - above_r)
        return jr * width + jc, above_r + above_c, hj
    # Suffix sums by a product with the upper triangle of ones (exact for
    # counts): it compiles far faster than a cumsum's associative scan.
    upper = jnp.asarray(np.triu(np.ones((size, size))), h.dtype)
    suffix = jax.lax.dot(upper, h, preferred_element_type=h.dtype)
    j = jnp.maximum(jnp.sum(suffix > limit, dtype=jnp.int32) - 1, 0)
    return j, suffix[j] - h[j], h[j]


def _select(
    x: jax.Array,
    limit: jax.Array,
    bits: int,
    chunk: int,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The largest key ``t`` whose entries at or above it sum (count, or sum
    ``weights``) to more than ``limit``, the sum above ``t`` and the sum at ``t``,
    digit by digit. For counts and ``limit = k - 1``: the k-th largest key."""
    udt = _KEY_FORMATS[bits][1]
    prefix, above = udt(0), jnp.zeros((), _sum_dtype(weights))
    for shift in range(bits - _DIGIT, -1, -_DIGIT):
        h = _digit_histogram(x, bits, shift, prefix, chunk, weights)
        j, a, at = _locate(h, limit)
        prefix = (prefix << udt(_DIGIT)) | j.astype(udt)
        limit, above = limit - a, above + a
    return prefix, above, at


def _tie_cut(
    x: jax.Array,
    t: jax.Array,
    limit: jax.Array,
    bits: int,
    chunk: int,
    weights: jax.Array | None = None,
) -> jax.Array:
    """The smallest ``p`` whose entries of key ``t`` in ``x[:p]`` sum (count, or
    sum ``weights``) to more than ``limit``: one past the tie that crosses it.

    Sums the ties per chunk, finds the chunk where the running sum crosses,
    and takes a cumulative sum over that chunk only. (For counts and
    ``limit = r - 1``: just past the ``r``-th tie.)
    """
    n = x.shape[0]
    dtype = _sum_dtype(weights)

    def ties(piece: jax.Array, w: jax.Array | None) -> jax.Array:
        hit = _monotone_key(piece, bits) == t
        return hit.astype(dtype) if w is None else jnp.where(hit, w.astype(dtype), 0)

    def window(start: jax.Array | int, size: int) -> jax.Array:
        piece = jax.lax.dynamic_slice(x, (start,), (size,))
        w = None if weights is None else jax.lax.dynamic_slice(weights, (start,), (size,))
        return ties(piece, w)

    if n <= chunk:
        return jnp.sum(jnp.cumsum(window(0, n), dtype=dtype) <= limit, dtype=jnp.int32) + 1
    full = n // chunk
    counts = jax.lax.fori_loop(
        0,
        full,
        lambda i, c: c.at[i].set(jnp.sum(window(i * chunk, chunk), dtype=dtype)),
        jnp.zeros((full + 1,), dtype),
    )
    if n > full * chunk:
        counts = counts.at[full].set(jnp.sum(window(full * chunk, n - full * chunk), dtype=dtype))
    cum = jnp.cumsum(counts, dtype=dtype)
    c = jnp.minimum(jnp.sum(cum <= limit, dtype=jnp.int32), full)  # where the sum crosses
    before = cum[c] - counts[c]  # ties in x[: c * chunk]
    # The window is the chunk, moved back to fit when it is the short tail;
    # the ties in the overlap are then subtracted from ``before``.
    start = jnp.minimum(c * chunk, n - chunk)
    overlap = c * chunk - start
    w = jnp.cumsum(window(start, chunk), dtype=dtype)
    before_start = before - jnp.where(overlap > 0, w[jnp.maximum(overlap - 1, 0)], 0)
    return start + jnp.sum(w <= limit - before_start, dtype=jnp.int32) + 1


@functools.partial(jax.jit, static_argnames=("chunk",))
def _topk_mask_radix(scores: jax.Array, k: jax.Array, chunk: int = _CHUNK) -> jax.Array:
    # k is traced (0 < k < n), so one compilation serves every k of a shape;
    # ``chunk`` is a parameter only so that tests reach the loops on small inputs.
    n = scores.shape[0]
    bits = _key_bits(scores.dtype)
    t, above, equal = _select(scores, k - 1, bits, chunk)
    r = k - above  # 1 <= r <= equal: how many of the ties at t are kept
    p = jax.lax.cond(
        r < equal,
        lambda: _tie_cut(scores, t, r - 1, bits, chunk),
        lambda: jnp.asarray(n, jnp.int32),
    )
    key = _monotone_key(scores, bits)
    return (key > t) | ((key == t) & (jnp.arange(n, dtype=jnp.int32) < p))


def _topk_mask_sort(scores: jax.Array, k: int) -> jax.Array:
    """The top-k mask by a stable sort: the reference :func:`topk_mask_flat` matches.

    O(n log n); kept as the oracle for tests and benchmarks.
    """
    n = scores.shape[0]
    if k >= n:
        return jnp.ones((n,), bool)
    if k <= 0:
        return jnp.zeros((n,), bool)
    # A stable ascending sort of -score keeps the earlier index first on ties.
    order = jnp.argsort(-scores, stable=True)
    return jnp.zeros((n,), bool).at[order[:k]].set(True)


def topk_mask_flat(scores: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the ``k`` largest entries of a 1-D ``scores`` array.

        mask = argmax_{m in {0,1}^n, sum(m) = k} sum_i m_i s_i,

    with ties broken deterministically by position (the earlier entry wins),
    so the mask has exactly ``k`` True entries whatever the input. NaN scores
    rank last. (XLA on the CPU flushes float32 subnormals to zero, so a
    subnormal weight ranks as a zero; ``-0.0`` ties with ``0.0``. The key
    reproduces that rule itself, so the mask is the same on every backend.)
    The answer is the first ``k`` of a stable descending sort, computed
    without one:

        t = the k-th largest key,   mask_i = key_i > t  or  (key_i = t and i < p),

    where ``p`` is the position just past the ``(k - #{key > t})``-th entry with
    ``key = t``. ``t`` is found by a radix select over 16-bit digits of the
    monotone key (two histogram passes for float32, four for float64), so the
    cost is O(n) and the same for every ``k``. Jit-safe, no host callbacks;
    non-float scores use the sort.

    Args:
        scores: 1-D array of scores (e.g. ``|w|``).
        k: static number of entries to keep, ``0 <= k <= scores.size``.

    Returns:
        Boolean array of the shape of ``scores`` with exactly ``k`` True.

    References:
        Radix select: Alabi et al., "Fast k-selection algorithms for graphics
        processing units", ACM JEA 17 (2012), section 3.
    """
    n = scores.shape[0]
    if k >= n:
        return jnp.ones((n,), bool)
    if k <= 0:
        return jnp.zeros((n,), bool)
    if _key_bits(scores.dtype) is None or n >= 2**31:
        return _topk_mask_sort(scores, k)
    return _topk_mask_radix(scores, jnp.asarray(k, jnp.int32))


def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    """N:M mask: every block of ``m`` consecutive entries down a column keeps its ``n`` largest.

    For ``scores`` of shape ``(K, out)`` (the reduction axis first; a HWIO
    kernel is reshaped to ``(kh*kw*in, out)`` by the caller) and each column
    ``c`` and block ``b = 0, ..., K/m - 1``:

        mask[b*m + i, c] = rank_i < n,
        rank_i = #{j < i : s_j >= s_i} + #{j > i : s_j > s_i}   (j over the block),

    the position of entry ``i`` in a stable descending sort of its block, so
    ties go to the earlier entry and every block keeps exactly ``n``. Scores
    are ranked by the keys of :func:`topk_mask_flat` (NaN last, subnormals and
    ``-0.0`` as zero). The ranks are ``m(m-1)`` vectorised comparisons on a
    ``(K/m, m, out)`` view (a stable sort along the block for ``m > 16``).

    Args:
        scores: 2-D array ``(K, out)``, e.g. ``|w|``.
        n: static number kept per block, ``0 < n <= m``.
        m: static block length; must divide ``K``.

    Returns:
        Boolean array of the shape of ``scores`` with ``n`` True per block.

    Raises:
        ValueError: ``scores`` is not 2-D, ``m`` does not divide ``K``, or not
            ``0 < n <= m``.

    References:
        Mishra et al., "Accelerating Sparse Deep Neural Networks" (2021):
        2:4 structured sparsity.
    """
    if np.ndim(scores) != 2:
        raise ValueError(f"nm_mask needs 2-D scores (K, out), got shape {np.shape(scores)}.")
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}.")
    rows = np.shape(scores)[0]
    if rows % m:
        raise ValueError(
            f"M={m} does not divide the reduction size K={rows} of scores {np.shape(scores)}."
        )
    return _nm_mask(jnp.asarray(scores), n, m)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
    rows, cols = scores.shape
    bits = _key_bits(scores.dtype)
    if bits is not None:
        key = _monotone_key(scores, bits)
    else:  # integers rank by value; bools as 0/1
        key = scores.astype(jnp.int8) if scores.dtype == bool else scores
    if n == m:
        return jnp.ones(scores.shape, bool)
    blocks = key.reshape(rows // m, m, cols)
    if m > 16:
        # Rank by a stable ascending sort of the reversed order (descending keys).
        desc = ~blocks if bits is not None else -blocks
        order = jnp.argsort(desc, axis=1, stable=True)
        rank = jnp.argsort(order, axis=1)
        return (rank < n).reshape(rows, cols)
    entries = [blocks[:, i, :] for i in range(m)]
    keep = []
    for i, e in enumerate(entries):
        rank = sum(
            ((f >= e) if j < i else (f > e)).astype(jnp.int32)
            for j, f in enumerate(entries)
            if j != i
        )
        keep.append(rank < n)
    return jnp.stack(keep, axis=1).reshape(rows, cols)


@functools.partial(jax.jit, static_argnames=("groups",))
def _topk_masks_leaves(leaves: list[jax.Array], groups: tuple[Any, ...]) -> list[jax.Array]:
    masks = [jnp.ones(leaf.shape, bool) for leaf in leaves]
    for g in groups:
        scores = jnp.concatenate([jnp.abs(leaves[i]).ravel() for i in g.leaves])
        flat = topk_mask_flat(scores, g.k)
        part = scatter_flat(flat, g.leaves, leaves)
        for i in g.leaves:
            masks[i] = part[i]
    return masks


def topk_masks(params: PyTree, groups: Sequence[_Group]) -> PyTree:
    """Masks of the top-k projection, one top-k problem per group.

    Args:
        params: the pytree to project.
        groups: each with ``leaves`` (indices into ``jax.tree.leaves(params)``)
            and ``k`` (static): keep the ``k`` largest ``|w|`` over those
            leaves jointly. Leaves in no group are not pruned (all-True mask).

    Returns:
        A boolean pytree shaped like ``params``.
    """
    leaves, treedef = jax.tree.flatten(params)
    masks = _topk_masks_leaves(leaves, tuple(groups))
    return jax.tree.unflatten(treedef, masks)


def project(params: PyTree, budget: Any) -> PyTree:
    """Euclidean projection of ``params`` onto a budget set.

        Proj_S(V) = argmin_{Z in S} sum_l ||Z_l - V_l||^2

    Args:
        params: any pytree of arrays.
        budget: a :class:`admmprune.Budget`, e.g. ``ParamBudget(keep=0.02)``.

    Returns:
        A pytree like ``params`` with the entries outside the projection's
        support set to exactly zero. Non-prunable leaves are unchanged.

    Raises:
        InputError: a leaf holds NaN or inf (no ranking of magnitudes means
            anything then), or is not floating-point.

    Examples:
        >>> z = admmprune.project(params, admmprune.ParamBudget(count=5324))
    """
    from admmprune.guards import check_budget, check_params

    check_params(params)
    check_budget(budget, "project")
    return apply_masks(params, budget.mask(params))


__all__ = ["apply_masks", "nm_mask", "project", "topk_mask_flat", "topk_masks"]
