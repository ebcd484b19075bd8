"""Top-k projections against brute force and a cvxpy MILP, with drawn inputs."""

from __future__ import annotations

import itertools

import cvxpy as cp
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from admmprune import ParamBudget, project
from admmprune.projections import topk_mask_flat


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
    k = draw(st.integers(0, total))
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
