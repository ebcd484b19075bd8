"""The energy projection: greedy knapsack against brute force and HiGHS, and EnergyBudget."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import admmprune as ap
from admmprune.energy import LayerCost, LinearEnergy
from admmprune.knapsack import exact_knapsack, greedy_by_sort, greedy_core, greedy_knapsack


def brute_force(v: np.ndarray, c: np.ndarray, cap: float) -> float:
    """Smallest dropped value over every feasible subset."""
    best = float(v.sum())
    for r in range(len(v) + 1):
        for s in itertools.combinations(range(len(v)), r):
            s = list(s)
            if c[s].sum() <= cap:
                best = min(best, float(v.sum() - v[s].sum()))
    return best


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.0, 10.0), min_size=1, max_size=9),
    st.lists(st.integers(1, 20), min_size=9, max_size=9),
    st.floats(0.0, 100.0),
)
def test_greedy_is_feasible_and_bounded_by_the_lp(values, costs, cap):
    v = np.asarray(values, np.float64)
    c = np.asarray(costs[: len(v)], np.float64)
    mask, stats = greedy_knapsack(jnp.asarray(v, jnp.float32), jnp.asarray(c), cap)
    mask = np.asarray(mask)
    assert c[mask].sum() <= cap + 1e-9  # never over budget
    opt = brute_force(v, c, cap)
    assert stats.bound <= opt + 1e-4 * (1 + opt)  # the LP bound is a lower bound
    assert stats.removed >= opt - 1e-4 * (1 + opt)
    _, exact = exact_knapsack(v, c, cap)
    assert exact.removed == pytest.approx(opt, rel=1e-6, abs=1e-6)


def _both(values, costs, cap, chunk):
    """The selection greedy and the sort it replaces, on one instance."""
    with jax.enable_x64(True):
        args = (jnp.asarray(values), jnp.asarray(costs), jnp.asarray(cap, jnp.float64))
        fast = jax.jit(greedy_core, static_argnames=("chunk",))(*args, chunk=chunk)
        slow = jax.jit(greedy_by_sort)(*args)
        return [np.asarray(x) for x in fast], [np.asarray(x) for x in slow]


# A few sizes (each compiles once) and no shrinking (it would recompile for minutes).
@settings(max_examples=40, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(
    st.sampled_from([1, 2, 7, 64, 65, 300]),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["distinct", "ties", "zeros", "subnormal"]),
    st.floats(0.0, 1.2),
    st.sampled_from([7, 1 << 16]),
)
def test_selection_greedy_is_the_sorted_greedy(n, seed, kind, fraction, chunk):
    # Integer costs: every cost sum is exact in float64, whatever its order, so
    # the two must agree bit for bit on the mask, the cost and the count.
    rng = np.random.default_rng(seed)
    v = rng.random(n).astype(np.float32) ** 2
    if kind == "ties":
        v = rng.integers(0, 3, n).astype(np.float32)
    elif kind == "zeros":
        v[rng.random(n) < 0.5] = 0.0
    elif kind == "subnormal":
        v[rng.random(n) < 0.3] = np.float32(1e-40)
    c = rng.choice([1.0, 2.0, 3.0, 8.0, 40.0], n).astype(np.float32)
    cap = float(np.floor(fraction * c.sum()))
    fast, slow = _both(v, c, cap, chunk)
    np.testing.assert_array_equal(fast[0], slow[0])  # the mask
    assert fast[3] == slow[3] and fast[4] == slow[4]  # its cost and size
    np.testing.assert_allclose(fast[1:3], slow[1:3], rtol=1e-12, atol=1e-12)


def test_selection_greedy_agrees_on_a_large_energy_like_instance():
    n = 300_000  # several 2**16 chunks and a tail
    rng = np.random.default_rng(3)
    v = rng.standard_normal(n).astype(np.float32) ** 2
    v[:1000] = 0.25  # a block of ties
    c = rng.choice([210.0, 1492.0, 2792.0], n).astype(np.float32)
    for fraction in (0.01, 0.37, 0.9):
        cap = float(np.floor(c.sum() * fraction))
        fast, slow = _both(v, c, cap, 1 << 16)
        np.testing.assert_array_equal(fast[0], slow[0])
        assert fast[3] == slow[3] <= cap
        np.testing.assert_allclose(fast[1:3], slow[1:3], rtol=1e-9)


def test_greedy_gap_to_exact_is_small_on_random_instances():
    from admmprune.bench.energy import greedy_gaps

    g = greedy_gaps(instances=25, seed=1)
    assert g["median_gap"] < 1e-3 and g["mean_gap"] < 0.05


def test_float64_costs_never_overshoot_a_large_budget():
    # Costs summing far beyond 2**24, where a float32 running sum rounds.
    n = 200_000
    rng = np.random.default_rng(0)
    c = rng.choice([210.0, 1492.3, 2792.7], n)
    v = rng.random(n).astype(np.float32)
    cap = float(c.sum() * 0.37)
    mask, stats = greedy_knapsack(jnp.asarray(v), jnp.asarray(c), cap)
    assert float(np.asarray(c, np.float64)[np.asarray(mask)].sum()) <= cap
    assert stats.relative_gap < 1e-4


def _toy_params():
    rng = np.random.default_rng(0)
    return {
        "a": {"kernel": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)},
    }


def test_equal_costs_give_the_topk_projection():
    params = _toy_params()
    model = LinearEnergy.from_params(params, {"a/kernel": 3.0, "b/kernel": 3.0})
    for count in (0, 7, 23, 50):
        energy = ap.EnergyBudget(model, energy=3.0 * count)
        got = jax.tree.leaves(energy.mask(params))
        if count == 0:  # ParamBudget(count=0) is refused as empty; nothing fits
            want = [np.zeros(np.shape(m), bool) for m in got]
        else:
            want = jax.tree.leaves(ap.ParamBudget(count=count).mask(params))
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_kinked_costs_greedy_and_exact_respect_the_energy():
    params = _toy_params()
    layers = (
        LayerCost("a/kernel", 10.0, 2.0, 7.0, 4.0, 30),  # 4 cheap weights, then dear ones
        LayerCost("b/kernel", 5.0, 3.0, 3.0, float("inf"), 20),
    )
    model = LinearEnergy(layers, constant=1.0)
    assert model.floor() == 16.0 and model.dense() == 16.0 + 8 + 26 * 7 + 60
    for frac in (0.15, 0.3, 0.6):
        budget = ap.EnergyBudget(model, fraction=frac)
        for method in ("greedy", "exact"):
            b = ap.EnergyBudget(model, fraction=frac, method=method)
            masks, _ = b.project_with_stats(params)
            assert model.energy(masks) <= budget.target() + 1e-9
        _, g = budget.project_with_stats(params)
        _, e = ap.EnergyBudget(model, fraction=frac, method="exact").project_with_stats(params)
        assert g.bound <= e.removed + 1e-6 <= g.removed + 2e-6


def test_budget_below_the_floor_names_the_floor():
    params = _toy_params()
    model = LinearEnergy.from_params(params, {"a/kernel": 1.0}, floors={"a/kernel": 50.0})
    with pytest.raises(ap.BudgetError, match=r"below the floor 50.*smallest feasible"):
        ap.EnergyBudget(model, energy=40.0)
    with pytest.raises(ap.BudgetError, match="exactly one"):
        ap.EnergyBudget(model)
    b = ap.EnergyBudget(model, fraction=0.7)
    assert b.relax(0.0).limit() == pytest.approx(model.dense())
    assert b.relax(1.0).limit() == pytest.approx(0.7 * model.dense())
    assert b.prunable(params) == [True, False]


def test_bilinear_fit_recovers_its_coefficients():
    rng = np.random.default_rng(0)
    true = ap.BilinearEnergy(("l1", "l2", "l3"), 5.0, (40.0, 100.0, 10.0))
    kept = rng.uniform(0.1, 1.0, (30, 3))
    energy = np.array([true.energy_of(k) for k in kept])
    model, fit = ap.BilinearEnergy.fit(("l1", "l2", "l3"), kept, energy)
    assert model.a == pytest.approx(true.a, rel=1e-6) and model.b0 == pytest.approx(5.0)
    assert fit.r2 > 0.999999 and model.dense() == pytest.approx(155.0)
    with pytest.raises(ValueError, match="at least 4"):
        ap.BilinearEnergy.fit(("l1", "l2", "l3"), kept[:3], energy[:3])
    with pytest.raises(ap.BudgetError, match="layer-wise"):
        ap.EnergyBudget(model, fraction=0.5)


def test_projected_sgd_and_energy_admm_meet_the_budget():
    import optax

    from admmprune.data import synthetic_classification

    d = synthetic_classification(512, image=False, classes=4, seed=0)
    params = {
        "fc1": {
            "kernel": jnp.asarray(
                np.random.default_rng(0).standard_normal((d.x.shape[1], 16)) * 0.1, jnp.float32
            )
        },
        "fc2": {"kernel": jnp.zeros((16, 4), jnp.float32)},
    }

    def loss_fn(p, batch):
        x, y = batch
        logits = jax.nn.relu(x @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    model = LinearEnergy.from_params(params, {"fc1/kernel": 1.0, "fc2/kernel": 4.0})
    budget = ap.EnergyBudget(model, fraction=0.3)
    data = (jnp.asarray(d.x), jnp.asarray(d.y))
    psgd = ap.ProjectedSGD(
        budget,
        optax.sgd(1e-2, momentum=0.9),
        projected_epochs=3,
        decay_epochs=2,
        finetune=ap.Finetune(epochs=1),
        batch_size=64,
    )
    res = psgd.run(params, loss_fn, data, key=jax.random.key(0))
    assert res.epochs == 4 and model.energy(res.params) <= budget.target()
    admm = ap.ADMM(
        budget, optax.adam(1e-2), iterations=3, finetune=ap.Finetune(epochs=1), batch_size=64,
        metric=ap.Fisher(), rho=1e-3,
    )  # fmt: skip
    res = admm.run(params, loss_fn, data, key=jax.random.key(0))
    assert model.energy(res.params) <= budget.target()
    rec = res.records("admm")[-1]
    assert rec["energy_fraction"] <= 0.3 + 1e-9 and 0 <= rec["projection_gap"] < 1
    d_l = jax.tree.leaves(res.state.metric)
    sizes = [a.size for a in jax.tree.leaves(params)]
    assert sum(float(x) * s for x, s in zip(d_l, sizes, strict=True)) / sum(sizes) == pytest.approx(
        1.0, rel=1e-5
    )


def test_blind_tuning_steps_toward_the_budget():
    from admmprune.bench.energy import next_count

    # Proportional on the energy above the floor: halfway over -> about 2/3 the count.
    a = [{"count": 900, "energy": 16.0}]
    assert next_count(a, limit=12.0, floor=4.0) == int(900 * 8 / 12 * 0.99)
    # Under budget only: scale up.
    assert next_count([{"count": 300, "energy": 8.0}], limit=12.0, floor=4.0) == 600
    # Bracketed: the secant, strictly inside the bracket, never a count already tried.
    a = [{"count": 600, "energy": 13.0}, {"count": 500, "energy": 11.0}]
    assert next_count(a, limit=12.0, floor=4.0) == 550
    a = [{"count": 501, "energy": 13.0}, {"count": 500, "energy": 11.0}]
    assert next_count(a, limit=12.0, floor=4.0) == 499


def test_the_exact_knapsack_prints_nothing_to_stdout():
    """HiGHS writes a banner to the process's stdout from C++; it must not reach a
    command's output (``--json``). A fresh process: the banner comes once per process."""
    import subprocess
    import sys

    code = (
        "import numpy as np; from admmprune.knapsack import exact_knapsack; "
        "m, _ = exact_knapsack(np.array([3.0, 2.0, 1.0]), np.array([1.0, 1.0, 1.0]), 2.0); "
        "print('mask', m.astype(int).tolist())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "mask [1, 1, 0]\n"
