"""Top-k projections against brute force and a cvxpy MILP, with drawn inputs."""

from __future__ import annotations

import itertools

import cvxpy as cp
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from admmprune import ParamBudget, project
from admmprune.projections import _topk_mask_radix, _topk_mask_sort, nm_mask, topk_mask_flat


def _objective(z: dict, v: dict) -> float:
    return sum(float(np.sum((np.asarray(z[k]) - np.asarray(v[k])) ** 2)) for k in v)


def _brute_force_best(values: np.ndarray, k: int) -> float:
    """min over all supports of size k of the squared distance (the dropped mass)."""
    sq = values**2
    best = np.inf
    for keep in itertools.combinations(range(values.size), k):
        dropped = sq.sum() - sq[list(keep)].sum()
        best = min(best, dropped)
    return float(best)


# Small integers make ties common, which is where exact-count bugs hide.
small_values = st.integers(-3, 3).map(float)


@st.composite
def trees_and_k(draw, max_total: int = 9):
    n_leaves = draw(st.integers(1, 3))
    tree = {}
    for i in range(n_leaves):
        shape = draw(hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=3))
        tree[f"l{i}"] = draw(hnp.arrays(np.float32, shape, elements=small_values))
    total = sum(a.size for a in tree.values())
    if total > max_total:
        tree = {"l0": tree["l0"]}
        total = tree["l0"].size
    k = draw(st.integers(1, total))  # count=0 is an empty budget, refused
    return tree, k


@given(trees_and_k())
def test_global_topk_is_optimal_exact_and_idempotent(case):
    tree, k = case
    budget = ParamBudget(count=k)
    z = project(tree, budget)
    flat_v = np.concatenate([a.ravel() for a in tree.values()])
    mask = np.concatenate([np.asarray(m).ravel() for m in budget.mask(tree).values()])
    assert mask.sum() == k  # exactly k kept, ties or not
    assert np.count_nonzero(np.concatenate([np.asarray(a).ravel() for a in z.values()])) <= k
    assert _objective(z, tree) == pytest.approx(_brute_force_best(flat_v, k), abs=1e-6)
    z2 = project(z, budget)
    for name in tree:
        np.testing.assert_array_equal(np.asarray(z2[name]), np.asarray(z[name]))


@given(trees_and_k())
def test_ties_break_toward_earlier_entries(case):
    tree, k = case
    mask = np.concatenate([np.asarray(m).ravel() for m in ParamBudget(count=k).mask(tree).values()])
    scores = np.abs(np.concatenate([a.ravel() for a in tree.values()]))
    # Reference: a stable sort on -|v| (earlier index wins ties), first k.
    expected = np.zeros_like(mask)
    expected[np.argsort(-scores, kind="stable")[:k]] = True
    np.testing.assert_array_equal(mask, expected)


# XLA flushes float32 subnormals to zero on the CPU, so they count as zeros there.
@given(
    hnp.arrays(
        np.float32, st.integers(1, 40), elements=st.floats(-5, 5, width=32, allow_subnormal=False)
    )
)
def test_point_inside_the_set_is_unchanged(v):
    k = int(np.count_nonzero(v))
    assume(k > 0)  # count=0 is an empty budget, refused
    z = project({"w": v.reshape(1, -1)}, ParamBudget(count=k))
    np.testing.assert_array_equal(np.asarray(z["w"]).ravel(), v)


def _milp_value(tree: dict, groups: list[tuple[list[str], int]]) -> float:
    """max kept squared mass s.t. per-group cardinality, solved as a MILP by HiGHS."""
    objective, constraints = 0, []
    for names, k in groups:
        sq = np.concatenate([tree[n].ravel() ** 2 for n in names]).astype(np.float64)
        b = cp.Variable(sq.size, boolean=True)
        objective = objective + sq @ b
        constraints.append(cp.sum(b) <= k)
    prob = cp.Problem(cp.Maximize(objective), constraints)
    prob.solve(solver=cp.HIGHS)
    assert prob.status == cp.OPTIMAL
    total = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in tree.values())
    return total - prob.value


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_matches_cvxpy_milp(seed, allocation):
    rng = np.random.default_rng(seed)
    tree = {
        "a": rng.standard_normal((4, 6)).astype(np.float32),
        "b": (rng.standard_normal((3, 5)) * 3).astype(np.float32),
    }
    budget = ParamBudget(keep=0.3, allocation=allocation)
    z = project(tree, budget)
    groups = [(list(tree), 12)] if allocation == "global" else None
    if groups is None:
        counts = {n: int(np.asarray(m).sum()) for n, m in budget.mask(tree).items()}
        assert sum(counts.values()) == round(0.3 * 39)
        groups = [([n], c) for n, c in counts.items()]
    assert _objective(z, tree) == pytest.approx(_milp_value(tree, groups), rel=1e-5, abs=1e-5)


def test_per_layer_counts_and_untouched_leaves():
    rng = np.random.default_rng(0)
    tree = {
        "fc1": {"kernel": rng.standard_normal((20, 10)), "bias": rng.standard_normal(10)},
        "fc2": {"kernel": rng.standard_normal((10, 4)), "bias": rng.standard_normal(4)},
    }
    tree = jax.tree.map(lambda a: a.astype(np.float32), tree)
    budget = ParamBudget(per_layer={"fc1": 0.1, "fc2/kernel": 7})
    z = project(tree, budget)
    assert np.count_nonzero(z["fc1"]["kernel"]) == 20
    assert np.count_nonzero(z["fc2"]["kernel"]) == 7
    np.testing.assert_array_equal(z["fc1"]["bias"], tree["fc1"]["bias"])
    np.testing.assert_array_equal(z["fc2"]["bias"], tree["fc2"]["bias"])


def test_uniform_allocation_is_proportional_and_exact():
    tree = {"a": np.ones((100, 10)), "b": np.ones((30, 3)), "c": np.ones((7, 1))}
    masks = ParamBudget(count=101, allocation="uniform").mask(tree)
    counts = {n: int(np.asarray(m).sum()) for n, m in masks.items()}
    assert sum(counts.values()) == 101
    assert counts == {"a": 92, "b": 8, "c": 1}  # 91.7, 8.3, 0.6 by largest remainder


def test_projection_is_jittable_and_matches_eager():
    rng = np.random.default_rng(1)
    tree = {"w": jnp.asarray(rng.standard_normal((50, 20)), jnp.float32)}
    budget = ParamBudget(keep=0.05)
    eager = project(tree, budget)
    jitted = jax.jit(lambda t: project(t, budget))(tree)
    np.testing.assert_array_equal(np.asarray(eager["w"]), np.asarray(jitted["w"]))
    assert np.count_nonzero(np.asarray(jitted["w"])) == 50


def test_prunable_filter_override():
    tree = {"emb": np.ones((4, 4)), "bias": np.arange(1.0, 9.0)}
    budget = ParamBudget(count=2, prunable_filter=lambda name, leaf: name == "bias")
    z = project(tree, budget)
    np.testing.assert_array_equal(z["emb"], tree["emb"])
    np.testing.assert_array_equal(np.asarray(z["bias"]), [0, 0, 0, 0, 0, 0, 7, 8])


def test_topk_mask_flat_edges_and_nan():
    s = jnp.asarray([1.0, jnp.nan, 3.0, 2.0])
    np.testing.assert_array_equal(topk_mask_flat(s, 2), [False, False, True, True])
    assert not topk_mask_flat(s, 0).any()
    assert topk_mask_flat(s, 4).all()


# ------------------------------------------------ the radix top-k against the sort
# Scores where ranking bugs hide: ties (small integers), both zeros, subnormals
# (XLA:CPU flushes them to zero), the smallest normal, NaNs of both signs, infinities.
_SPECIAL = [0.0, -0.0, 1e-40, -1e-40, 1e-45, 1.1754944e-38, np.nan, -np.nan, np.inf, -np.inf]
_SCORE = st.one_of(
    st.sampled_from(_SPECIAL),
    st.integers(-3, 3).map(float),
    st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True),
)
# A few sizes, so compilations are shared across examples (k is traced, not static).
_SIZES = (1, 2, 3, 7, 16, 33, 100)


def _numpy_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """First k of a stable descending numpy sort, subnormals and -0.0 as zero, NaN last."""
    s = np.asarray(scores, np.float64).copy()
    tiny = np.finfo(np.asarray(scores).dtype).tiny if scores.dtype != np.float16 else 0.0
    s[np.abs(s) < tiny] = 0.0
    s[np.isnan(s)] = -np.inf
    order = sorted(range(s.size), key=lambda i: (np.isnan(scores[i]), -s[i], i))
    out = np.zeros(s.size, bool)
    out[order[:k]] = True
    return out


@st.composite
def scores_and_k(draw, dtype=np.float32, sizes=_SIZES):
    n = draw(st.sampled_from(sizes))
    scores = draw(hnp.arrays(dtype, n, elements=_SCORE.map(lambda v: np.asarray(v, dtype))))
    return scores, draw(st.integers(0, n))


@given(scores_and_k())
def test_radix_topk_equals_the_sort_oracle(case):
    scores, k = case
    mask = np.asarray(topk_mask_flat(jnp.asarray(scores), k))
    np.testing.assert_array_equal(mask, np.asarray(_topk_mask_sort(jnp.asarray(scores), k)))
    np.testing.assert_array_equal(mask, _numpy_topk(scores, k))
    assert mask.sum() == k


@given(scores_and_k(sizes=(17, 40, 100)), st.sampled_from([4, 16]))
def test_radix_topk_chunked_paths_equal_the_oracle(case, chunk):
    # Small chunks reach the chunk loop, the short tail and the tie-cut window on small n.
    scores, k = case
    expected = np.asarray(_topk_mask_sort(jnp.asarray(scores), k))
    if 0 < k < scores.size:
        got = _topk_mask_radix(jnp.asarray(scores), jnp.asarray(k, jnp.int32), chunk=chunk)
        np.testing.assert_array_equal(np.asarray(got), expected)


@given(scores_and_k(sizes=(5, 33)))
def test_radix_topk_under_jit_with_static_k(case):
    scores, k = case
    jitted = jax.jit(topk_mask_flat, static_argnums=1)(jnp.asarray(scores), k)
    np.testing.assert_array_equal(np.asarray(jitted), _numpy_topk(scores, k))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@given(data=st.data())
def test_radix_topk_half_precision(dtype, data):
    scores, k = data.draw(scores_and_k(sizes=(7, 33)))
    x = jnp.asarray(scores).astype(dtype)  # f16 subnormals are ordered, bf16 ones flushed
    np.testing.assert_array_equal(
        np.asarray(topk_mask_flat(x, k)), np.asarray(_topk_mask_sort(x, k))
    )


@given(
    hnp.arrays(
        np.float64,
        st.sampled_from([6, 40]),
        elements=st.one_of(
            st.sampled_from([0.0, -0.0, 1e-310, -5e-324, 2.2250738585072014e-308, np.nan]),
            st.integers(-2, 2).map(float),
            st.floats(allow_subnormal=True),
        ),
    ),
    st.integers(0, 40),
)
def test_radix_topk_float64(scores, k):
    k = min(k, scores.size)
    with jax.enable_x64(True):
        x = jnp.asarray(scores)
        assert x.dtype == jnp.float64
        np.testing.assert_array_equal(
            np.asarray(topk_mask_flat(x, k)), np.asarray(_topk_mask_sort(x, k))
        )
        got = _topk_mask_radix(x, jnp.asarray(max(1, min(k, x.size - 1)), jnp.int32), chunk=4)
        want = _topk_mask_sort(x, max(1, min(k, x.size - 1)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kind", ["ties", "gaussian", "mostly_zero"])
def test_radix_topk_many_chunks(kind):
    # Past one 2^16 chunk with a short tail, at the default chunk size.
    rng = np.random.default_rng(3)
    n = 3 * 2**16 + 5
    scores = {
        "ties": rng.integers(0, 3, n).astype(np.float32),
        "gaussian": np.abs(rng.standard_normal(n)).astype(np.float32),
        "mostly_zero": np.where(rng.random(n) < 0.8, 0.0, rng.standard_normal(n)),
    }[kind].astype(np.float32)
    x = jnp.asarray(scores)
    for k in (1, n // 10, n // 2, n - 1, int(rng.integers(1, n))):
        np.testing.assert_array_equal(
            np.asarray(topk_mask_flat(x, k)), np.asarray(_topk_mask_sort(x, k))
        )


def test_radix_topk_non_float_scores_use_the_sort():
    s = jnp.asarray([3, 1, 3, 2, 0], jnp.int32)
    np.testing.assert_array_equal(topk_mask_flat(s, 2), [True, False, True, False, False])


# ------------------------------------------------------------------------ N:M
def _numpy_nm(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Brute force: a stable descending sort of every block (subnormals as 0, NaN last)."""
    s = np.asarray(scores, np.float32).astype(np.float64)
    s[np.abs(s) < np.finfo(np.float32).tiny] = 0.0
    out = np.zeros(s.shape, bool)
    for c in range(s.shape[1]):
        for start in range(0, s.shape[0], m):
            block = s[start : start + m, c]
            order = sorted(range(m), key=lambda i: (np.isnan(block[i]), -block[i], i))
            out[start + np.array(order[:n]), c] = True
    return out


@st.composite
def nm_cases(draw):
    n, m = draw(st.sampled_from([(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (4, 4), (3, 20)]))
    blocks = draw(st.sampled_from([1, 3]))
    cols = draw(st.sampled_from([1, 5]))
    scores = draw(hnp.arrays(np.float32, (blocks * m, cols), elements=_SCORE.map(np.float32)))
    return scores, n, m


@given(nm_cases())
def test_nm_mask_equals_brute_force(case):
    scores, n, m = case
    mask = np.asarray(nm_mask(jnp.asarray(scores), n, m))
    np.testing.assert_array_equal(mask, _numpy_nm(scores, n, m))
    assert (mask.reshape(-1, m, scores.shape[1]).sum(axis=1) == n).all()


def test_nm_mask_ties_go_to_the_earlier_entry():
    scores = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [1.0, -0.0], [2.0, 1e-40]])
    np.testing.assert_array_equal(
        nm_mask(scores, 2, 4), [[True, True], [False, True], [False, False], [True, False]]
    )


def test_nm_mask_under_jit():
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.integers(0, 3, (16, 6)).astype(np.float32))
    jitted = jax.jit(nm_mask, static_argnums=(1, 2))(scores, 2, 4)
    np.testing.assert_array_equal(np.asarray(jitted), _numpy_nm(np.asarray(scores), 2, 4))


@pytest.mark.parametrize(
    "shape, n, m, match",
    [
        ((6, 3), 2, 4, "M=4 does not divide the reduction size K=6"),
        ((8, 3), 0, 4, r"0 < N <= M, got 0:4"),
        ((8, 3), 5, 4, r"0 < N <= M, got 5:4"),
        ((8, 3), -1, 2, r"0 < N <= M, got -1:2"),
        ((8,), 2, 4, "2-D scores"),
        ((2, 2, 4), 2, 4, "2-D scores"),
    ],
)
def test_nm_mask_rejects_bad_shapes_and_counts(shape, n, m, match):
    with pytest.raises(ValueError, match=match):
        nm_mask(jnp.zeros(shape), n, m)
