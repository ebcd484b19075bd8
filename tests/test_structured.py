"""Structured budgets (admmprune.structured) against brute force on small networks.

ChannelBudget: the best channel subset by enumeration; MacsBudget: the best
per-group counts (and branch subsets) by enumeration, MACs by hand; NMBudget: a
numpy N:M oracle. Then a solver run with a channel budget, compacted.
"""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from admmprune import (
    Budget,
    BudgetError,
    Finetune,
    MagnitudePrune,
    apply_masks,
    in_budget,
    models,
    projections,
)
from admmprune.data import synthetic_classification
from admmprune.groups import derive
from admmprune.nnx import split_nnx
from admmprune.structured import ChannelBudget, MacsBudget, NMBudget

# ---------------------------------------------------------------------------- networks


class MLP(nnx.Module):
    """din -> widths... -> dout, relu between; layers fc0, fc1, ..."""

    def __init__(self, rngs, widths=(4, 3), din=3, dout=2):
        dims = (din, *widths, dout)
        self.depth = len(dims) - 1
        for i in range(self.depth):
            setattr(self, f"fc{i}", nnx.Linear(dims[i], dims[i + 1], rngs=rngs))

    def __call__(self, x):
        for i in range(self.depth):
            x = getattr(self, f"fc{i}")(x)
            if i < self.depth - 1:
                x = jax.nn.relu(x)
        return x


class ConvNet(nnx.Module):
    """(6, 6, 2) -> conv3x3 SAME c1 -> relu -> conv3x3 SAME c2 -> relu -> flatten -> 3."""

    def __init__(self, rngs, c1=4, c2=3):
        self.conv1 = nnx.Conv(2, c1, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(36 * c2, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        return self.fc(x.reshape(x.shape[0], -1))


class ResAdd(nnx.Module):
    """stem 4 -> h + conv_b(relu(conv_a(relu(h)))) -> mean -> 3: stem and conv_b one group."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(2, 4, (3, 3), padding="SAME", rngs=rngs)
        self.conv_a = nnx.Conv(4, 3, (3, 3), padding="SAME", rngs=rngs)
        self.conv_b = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x)
        h = h + self.conv_b(jax.nn.relu(self.conv_a(jax.nn.relu(h))))
        return self.head(jax.nn.relu(h).mean(axis=(1, 2)))


class SelfLoop(nnx.Module):
    """h = fc0(x); h = h + fc1(relu(h)): fc1 reads and writes the same group."""

    def __init__(self, rngs):
        self.fc0 = nnx.Linear(3, 5, rngs=rngs)
        self.fc1 = nnx.Linear(5, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        h = self.fc0(x)
        h = h + self.fc1(jax.nn.relu(h))
        return self.fc2(jax.nn.relu(h))


def random_params(model, seed):
    """Gaussian params shaped like ``model``'s (numpy, float32; variances positive)."""
    params, _ = split_nnx(model)
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    values = []
    for path, leaf in flat:
        if str(path[-1].key) == "var":
            values.append(rng.uniform(0.5, 2.0, np.shape(leaf)).astype(np.float32))
        else:
            values.append(rng.standard_normal(np.shape(leaf)).astype(np.float32))
    return jax.tree.unflatten(jax.tree.structure(params), values)


def structure_of(cls, input_shape, **kwargs):
    """(structure, abstract model) without running flax's initializers."""
    model = nnx.eval_shape(lambda: cls(nnx.Rngs(0), **kwargs))
    return derive(model, input_shape), model


def mlp(widths, din=3, dout=2, seed=0):
    s, model = structure_of(MLP, (din,), widths=tuple(widths), din=din, dout=dout)
    return s, random_params(model, seed)


# ---------------------------------------------------------------------------- oracles


def mlp_energy(params, depth):
    """||v_c||^2 of every hidden channel of an MLP: its kernel column and bias entry."""
    return {
        f"fc{i}/kernel": (params[f"fc{i}"]["kernel"].astype(np.float64) ** 2).sum(0)
        + params[f"fc{i}"]["bias"].astype(np.float64) ** 2
        for i in range(depth - 1)
    }


def mlp_macs(din, counts, dout):
    """MACs of the chain din -> counts... -> dout."""
    dims = [din, *counts, dout]
    return sum(a * b for a, b in itertools.pairwise(dims))


def brute_channels(energy, k, floor):
    """argmax over channel subsets K, >= floor[g] per group, |K| <= k, of sum_K energy.

    Returns (best value, best keep, whether the best is unique).
    """
    names = list(energy)
    per_group = []
    for n in names:
        size = len(energy[n])
        options = []
        for r in range(min(floor, size), size + 1):
            for comb in itertools.combinations(range(size), r):
                keep = np.zeros(size, bool)
                keep[list(comb)] = True
                options.append((keep, float(energy[n][keep].sum()), r))
        per_group.append(options)
    best, arg, values = -1.0, None, []
    for combo in itertools.product(*per_group):
        if sum(c[2] for c in combo) > k:
            continue
        v = sum(c[1] for c in combo)
        values.append(v)
        if v > best:
            best, arg = v, {n: c[0] for n, c in zip(names, combo, strict=True)}
    unique = sum(abs(v - best) <= 1e-9 * max(best, 1) for v in values) == 1
    return best, arg, unique


def kept_channels(params, depth):
    """Kept hidden channels of a masked MLP, read off its bias (a producer)."""
    return {f"fc{i}/kernel": np.asarray(params[f"fc{i}"]["bias"]) != 0 for i in range(depth - 1)}


def mlp_masks(keep, params, depth):
    """The structured masks of an MLP for kept channels, built by hand."""
    out = {}
    for i in range(depth):
        rows = keep.get(f"fc{i - 1}/kernel") if i > 0 else None
        cols = keep.get(f"fc{i}/kernel") if i < depth - 1 else None
        n_in, n_out = params[f"fc{i}"]["kernel"].shape
        r = np.ones(n_in, bool) if rows is None else rows
        c = np.ones(n_out, bool) if cols is None else cols
        out[f"fc{i}"] = {"kernel": np.outer(r, c), "bias": c.copy()}
    return out


def brute_counts(structure, energy, capacity, floor=1):
    """argmax over per-group counts of the top-count energies with macs(counts) <= capacity."""
    names = [g.name for g in structure.groups]
    ranked = {n: np.sort(np.asarray(energy[n], np.float64))[::-1] for n in names}
    best, arg = -1.0, None
    ranges = [range(min(floor, g.size), g.size + 1) for g in structure.groups]
    for counts in itertools.product(*ranges):
        c = dict(zip(names, counts, strict=True))
        if structure.macs(c) <= capacity:
            v = sum(float(ranked[n][:k].sum()) for n, k in c.items())
            if v > best:
                best, arg = v, c
    return best, arg


def kept_value(structure, energy, keep):
    return sum(
        float(np.asarray(energy[g.name], np.float64)[np.asarray(keep[g.name])].sum())
        for g in structure.groups
    )


# One compile of a whole projection beats the dozens of per-op compiles of an eager
# call on a fresh shape; XLA's backend optimizations cost more than they save here.
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def _projector(budget):
    return quick_jit(lambda p: budget.project(p).masks)


def project_masks(budget, params):
    """``budget.project(params).masks``, jitted for the budgets whose projection traces."""
    if isinstance(budget, ChannelBudget | NMBudget):
        return _projector(budget)(params)
    return budget.project(params).masks


def masked(params, budget):
    return apply_masks(params, project_masks(budget, params))


def assert_fixed_point(z, budget):
    """``in_budget``'s definition, on the jitted projection: Proj(z) = z."""
    for a, b in zip(jax.tree.leaves(z), jax.tree.leaves(masked(z, budget)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def parse(pattern, text):
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return found.group(1)


# ---------------------------------------------------------------------------- ChannelBudget


@pytest.mark.parametrize(
    "widths, k, min_channels",
    [((4, 3), 3, 1), ((4, 3), 5, 1), ((3, 3, 3), 4, 1), ((4, 4), 5, 2), ((2, 5), 7, 2)],
)
def test_channel_projection_is_the_brute_force_optimum(widths, k, min_channels):
    s, params = mlp(widths, seed=sum(widths) + k)
    depth = len(widths) + 1
    energy = mlp_energy(params, depth)
    best, arg, unique = brute_channels(energy, k, min_channels)
    budget = ChannelBudget(s, count=k, min_channels=min_channels)
    budget.check(params)
    masks = project_masks(budget, params)
    got = kept_channels(apply_masks(params, masks), depth)
    assert sum(float(energy[n][got[n]].sum()) for n in got) == pytest.approx(best, rel=1e-5)
    assert sum(int(v.sum()) for v in got.values()) <= k
    assert unique  # continuous weights: the optimum is unique, so the masks are determined
    for n in got:
        np.testing.assert_array_equal(got[n], arg[n])
    expected = mlp_masks(arg, params, depth)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    z = apply_masks(params, masks)
    assert budget.measure(z) == {"channels": float(min(k, sum(widths)))}
    assert_fixed_point(z, budget)


def test_channel_projection_is_in_budget():
    s, params = mlp((4, 3), seed=1)
    budget = ChannelBudget(s, count=3)
    projection = budget.project(params)
    assert projection.figures == {}
    z = apply_masks(params, projection.masks)
    assert in_budget(z, budget)
    assert not in_budget(params, budget)  # the dense point is not in the set
    fc0, fc1 = np.array([1, 1, 0, 0], bool), np.array([0, 1, 0], bool)
    inside = apply_masks(params, s.masks(params, {"fc0/kernel": fc0, "fc1/kernel": fc1}))
    assert in_budget(inside, budget)  # 2 + 1 channels: a point of the set is its projection
    fc1 = np.array([0, 1, 1], bool)
    outside = apply_masks(params, s.masks(params, {"fc0/kernel": fc0, "fc1/kernel": fc1}))
    assert not in_budget(outside, budget)  # 2 + 2 channels


def test_channel_projection_of_a_conv_net_matches_brute_force():
    s, model = structure_of(ConvNet, (6, 6, 2))
    params = random_params(model, 3)
    energy = {  # HWIO: a channel's energy is its output slice plus its bias entry
        f"conv{i}/kernel": (params[f"conv{i}"]["kernel"] ** 2).sum((0, 1, 2))
        + params[f"conv{i}"]["bias"] ** 2
        for i in (1, 2)
    }
    _, arg, unique = brute_channels(energy, 4, 1)
    got = project_masks(ChannelBudget(s, count=4), params)
    assert unique
    for i in (1, 2):
        np.testing.assert_array_equal(np.asarray(got[f"conv{i}"]["bias"]), arg[f"conv{i}/kernel"])
    # the flatten consumer: fc row r reads channel r % c2
    rows = np.asarray(got["fc"]["kernel"]).any(1)
    np.testing.assert_array_equal(rows, np.tile(arg["conv2/kernel"], 36))


@settings(max_examples=8)
@given(
    widths=st.lists(st.integers(2, 4), min_size=1, max_size=2),
    data=st.data(),
)
def test_channel_projection_property(widths, data):
    seed = data.draw(st.integers(0, 2**16))
    min_channels = data.draw(st.integers(1, min(widths)))
    floor = min_channels * len(widths)
    k = data.draw(st.integers(floor, sum(widths)))
    s, params = mlp(widths, seed=seed)
    depth = len(widths) + 1
    budget = ChannelBudget(s, count=k, min_channels=min_channels)
    budget.check(params)
    z = masked(params, budget)
    kept = kept_channels(z, depth)
    assert sum(int(v.sum()) for v in kept.values()) == k  # nonnegative energies: spend it all
    assert all(int(v.sum()) >= min_channels for v in kept.values())
    energy = mlp_energy(params, depth)
    best, _, _ = brute_channels(energy, k, min_channels)
    assert sum(float(energy[n][kept[n]].sum()) for n in kept) == pytest.approx(best, rel=1e-5)
    # feasibility and idempotence: the projected point is its own projection
    assert_fixed_point(z, budget)
    # consumers of removed channels are zero too (nothing reads a removed channel)
    for i in range(1, depth):
        rows = kept[f"fc{i - 1}/kernel"]
        assert not np.asarray(z[f"fc{i}"]["kernel"])[~rows].any()


def test_channel_keep_fraction_and_relax():
    s, params = mlp((4, 4))
    budget = ChannelBudget(s, keep=0.5)
    assert budget._k() == 4
    full = budget.relax(0.0)  # dense: every channel kept
    assert full._k() == 8
    assert all(bool(np.all(m)) for m in jax.tree.leaves(project_masks(full, params)))
    assert budget.relax(1.0)._k() == 4
    assert budget.relax(0.5)._k() == 6  # halfway from 8 to 4


def test_channel_per_layer_keeps_top_channels_of_named_groups():
    s, params = mlp((5, 4, 3), seed=7)
    energy = mlp_energy(params, 4)
    budget = ChannelBudget(s, per_layer={"fc0/kernel": 2, "fc1/kernel": 0.5})
    budget.check(params)
    assert budget.counts() == {"fc0/kernel": 2, "fc1/kernel": 2}
    kept = kept_channels(masked(params, budget), 4)
    for name, k in (("fc0/kernel", 2), ("fc1/kernel", 2)):
        top = np.zeros(len(energy[name]), bool)
        top[np.argsort(-energy[name])[:k]] = True
        np.testing.assert_array_equal(kept[name], top)
    assert kept["fc2/kernel"].all()  # not named: kept whole
    assert_fixed_point(masked(params, budget), budget)
    relaxed = budget.relax(0.0)
    assert relaxed.counts() == {"fc0/kernel": 5, "fc1/kernel": 4}
    assert budget.describe()["per_layer"] == {"fc0/kernel": 2, "fc1/kernel": 2}


def test_channel_uniform_allocation_keeps_the_same_fraction_per_group():
    s, params = mlp((6, 4, 2), seed=3)
    energy = mlp_energy(params, 4)
    budget = ChannelBudget(s, keep=0.5, allocation="uniform")
    budget.check(params)
    assert budget.counts() == {"fc0/kernel": 3, "fc1/kernel": 2, "fc2/kernel": 1}
    kept = kept_channels(masked(params, budget), 4)
    for name, k in budget.counts().items():
        top = np.zeros(len(energy[name]), bool)
        top[np.argsort(-energy[name])[:k]] = True
        np.testing.assert_array_equal(kept[name], top)


def test_channel_uniform_allocation_never_exceeds_the_count():
    # regression: uniform shares were rounded one by one (3 groups of 3, count=5 kept 6)
    s, params = mlp((3, 3, 3))
    budget = ChannelBudget(s, count=5, allocation="uniform")
    budget.check(params)
    assert sum(budget.counts().values()) <= 5
    assert budget.measure(masked(params, budget))["channels"] <= 5


def test_channel_min_channels_holds_in_every_group():
    # regression: the global floor was min(min_channels, smallest group), not per group
    s, params = mlp((2, 5, 5), seed=0)
    params["fc1"]["kernel"] *= 10.0  # the spare channels all go to fc1 ...
    budget = ChannelBudget(s, count=8, min_channels=3)
    budget.check(params)  # floor 2 + 3 + 3 = 8
    kept = kept_channels(masked(params, budget), 4)
    assert int(kept["fc2/kernel"].sum()) >= 3  # ... and fc2 must still keep 3


def test_channel_check_names_the_smallest_feasible_count():
    s, params = mlp((4, 3, 2))
    with pytest.raises(BudgetError, match=r"keep at least 3 of 9") as err:
        ChannelBudget(s, count=2).check(params)
    smallest = int(parse(r"keep at least (\d+) of", str(err.value)))
    fraction = float(parse(r"keep >= ([0-9.]+)", str(err.value)))
    ChannelBudget(s, count=smallest).check(params)
    ChannelBudget(s, keep=fraction).check(params)
    with pytest.raises(BudgetError, match=r"keep at least 6 of 9"):
        ChannelBudget(s, count=5, min_channels=2).check(params)
    ChannelBudget(s, count=6, min_channels=2).check(params)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({}, BudgetError, "exactly one of"),
        ({"keep": 0.5, "count": 3}, BudgetError, "exactly one of"),
        ({"keep": 1.5}, BudgetError, r"fraction in \[0, 1\]"),
        ({"count": 3, "min_channels": 0}, BudgetError, "min_channels must be at least 1"),
        ({"per_layer": {"nope": 2}}, BudgetError, r"names \['nope'\].*fc0/kernel"),
    ],
)
def test_channel_budget_rejects_bad_arguments(kwargs, error, words):
    s, _ = mlp((4, 3))
    with pytest.raises(error, match=words):
        ChannelBudget(s, **kwargs)


@pytest.mark.parametrize("k, words", [(0, "0 of 4 channels kept"), (5, "5 of 4 channels kept")])
def test_channel_per_layer_count_out_of_range(k, words):
    s, params = mlp((4, 3))
    with pytest.raises(BudgetError, match=words):
        ChannelBudget(s, per_layer={"fc0/kernel": k}).check(params)


def test_channel_budget_protocol_and_pricing():
    s, params = mlp((4, 3))
    budget = ChannelBudget(s, count=4)
    assert isinstance(budget, Budget)
    assert hash(budget) == hash(ChannelBudget(s, count=4))
    names = ["fc0/bias", "fc0/kernel", "fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel"]
    assert dict(zip(names, budget.prunable(params), strict=True)) == {
        "fc0/bias": True,
        "fc0/kernel": True,
        "fc1/bias": True,
        "fc1/kernel": True,
        "fc2/bias": False,  # the output layer's bias is in no group
        "fc2/kernel": True,  # a consumer of fc1
    }
    with pytest.raises(BudgetError, match="keeps whole channels"):
        budget.pricing(params)
    assert budget.describe() == {
        "type": "channels",
        "allocation": "global",
        "min_channels": 1,
        "total_channels": 7,
        "kept_channels": 4,
    }


# ---------------------------------------------------------------------------- MacsBudget


def _macs_cases():
    return [
        ("mlp", MLP, (3,), {"widths": (5, 4), "din": 3, "dout": 2}),
        ("mlp3", MLP, (4,), {"widths": (4, 3, 4), "din": 4, "dout": 3}),
        ("conv", ConvNet, (6, 6, 2), {"c1": 5, "c2": 4}),
        ("residual", ResAdd, (6, 6, 2), {}),
        ("self_loop", SelfLoop, (3,), {}),
    ]


MACS_CASES = _macs_cases()


@pytest.fixture(scope="module")
def macs_problems():
    out = {}
    for name, cls, shape, kwargs in MACS_CASES:
        s, model = structure_of(cls, shape, **kwargs)
        out[name] = (s, random_params(model, len(name)))
    return out


def test_structure_macs_by_hand(macs_problems):
    s, _ = macs_problems["mlp"]
    for c0, c1 in itertools.product(range(1, 6), range(1, 5)):
        counts = {"fc0/kernel": c0, "fc1/kernel": c1}
        assert s.macs(counts) == pytest.approx(mlp_macs(3, [c0, c1], 2))
    s, _ = macs_problems["conv"]
    for c1, c2 in itertools.product(range(1, 6), range(1, 5)):
        hand = 36 * 18 * c1 + 36 * 9 * c1 * c2 + 36 * c2 * 3
        assert s.macs({"conv1/kernel": c1, "conv2/kernel": c2}) == pytest.approx(hand)
    s, _ = macs_problems["residual"]
    (joined,) = [g.name for g in s.groups if "+" in g.name]
    for j, a in itertools.product(range(1, 5), range(1, 4)):
        hand = 36 * 18 * j + 36 * 9 * j * a + 36 * 9 * a * j + j * 3
        assert s.macs({joined: j, "conv_a/kernel": a}) == pytest.approx(hand)
    s, _ = macs_problems["self_loop"]
    (g,) = s.groups
    for j in range(1, 6):
        assert s.macs({g.name: j}) == pytest.approx(3 * j + j * j + j * 2)


@pytest.mark.parametrize("keep", [0.2, 0.37, 0.55, 0.8])
@pytest.mark.parametrize("name", [c[0] for c in MACS_CASES])
def test_macs_exact_equals_brute_force_and_greedy_is_feasible(macs_problems, name, keep):
    s, params = macs_problems[name]
    energy = s.scores(params)
    exact = MacsBudget(s, keep=keep, exact=True)
    greedy = MacsBudget(s, keep=keep, bound=True)
    if exact.capacity < exact.floor():
        with pytest.raises(BudgetError):
            exact.check(params)
        return
    exact.check(params)
    best, _ = brute_counts(s, energy, exact.capacity)
    for budget in (exact, greedy):
        projection = budget.project(params)
        keep_ = s.kept(projection.masks)[0]
        macs = s.macs_of(projection.masks)
        assert macs <= budget.capacity + 1e-9
        assert all(v.any() for v in keep_.values())  # min_channels=1
        assert projection.figures["macs"] == pytest.approx(macs)
        assert projection.figures["macs_fraction"] == pytest.approx(macs / s.dense_macs)
        z = apply_masks(params, projection.masks)
        figures = {k: projection.figures[k] for k in ("macs", "macs_fraction")}
        assert budget.measure(z) == pytest.approx(figures)
        value = kept_value(s, energy, keep_)
        if budget.exact:
            assert value == pytest.approx(best, rel=1e-6)
            assert in_budget(z, budget)
        else:
            assert value <= best * (1 + 1e-6)
            # bound=True: the LP bound certifies the greedy, gap >= (optimum - greedy)
            total = sum(float(np.sum(np.asarray(v, np.float64))) for v in energy.values())
            assert projection.figures["projection_removed"] == pytest.approx(total - value)
            assert projection.figures["projection_gap"] >= best - value - 1e-6 * best


def test_macs_exact_with_a_floor_of_two(macs_problems):
    s, params = macs_problems["mlp3"]
    energy = s.scores(params)
    budget = MacsBudget(s, keep=0.45, min_channels=2, exact=True)
    budget.check(params)
    best, _ = brute_counts(s, energy, budget.capacity, floor=2)
    keep = s.kept(budget.project(params).masks)[0]
    assert all(int(v.sum()) >= 2 for v in keep.values())
    assert kept_value(s, energy, keep) == pytest.approx(best, rel=1e-6)


@settings(max_examples=10)
@given(
    widths=st.lists(st.integers(2, 4), min_size=1, max_size=3),
    t=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_macs_property_exact_optimal_greedy_feasible(widths, t, seed):
    s, params = mlp(widths, din=3, dout=2, seed=seed)
    floor = mlp_macs(3, [1] * len(widths), 2)
    keep = (floor + t * (s.dense_macs - floor)) / s.dense_macs  # from the floor to dense
    exact = MacsBudget(s, keep=keep, exact=True)
    exact.check(params)
    energy = mlp_energy(params, len(widths) + 1)
    best, _ = brute_counts(s, energy, exact.capacity)
    for budget in (exact, MacsBudget(s, keep=keep)):
        z = masked(params, budget)
        counts = [int(v.sum()) for v in kept_channels(z, len(widths) + 1).values()]
        assert mlp_macs(3, counts, 2) <= budget.capacity + 1e-9
        value = sum(
            float(e[k].sum())
            for e, k in zip(
                energy.values(), kept_channels(z, len(widths) + 1).values(), strict=True
            )
        )
        if budget.exact:
            assert value == pytest.approx(best, rel=1e-6)
        else:
            assert value <= best * (1 + 1e-6)


def test_macs_check_below_the_floor(macs_problems):
    s, params = macs_problems["mlp"]
    floor = 3 * 1 + 1 * 1 + 1 * 2  # one channel in each group
    budget = MacsBudget(s, keep=1.0)
    assert budget.floor() == pytest.approx(floor)
    with pytest.raises(BudgetError, match=r"smallest reachable, 6 with 1 channel") as err:
        MacsBudget(s, macs=5.5).check(params)
    assert str(s.dense_macs) in str(err.value)
    MacsBudget(s, macs=6).check(params)
    with pytest.raises(BudgetError, match="with 2 channel"):
        MacsBudget(s, macs=floor + 1, min_channels=2).check(params)


def test_macs_check_names_a_feasible_keep():
    # regression: the suggested keep was rounded down (.4g) below the floor
    s, params = mlp((2, 2), din=7, dout=3)
    with pytest.raises(BudgetError) as err:
        MacsBudget(s, keep=0.3).check(params)
    named = float(parse(r"use keep >= ([0-9.e-]+)", str(err.value)))
    MacsBudget(s, keep=named).check(params)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({}, "exactly one of"),
        ({"keep": 0.5, "macs": 10}, "exactly one of"),
        ({"keep": 0.0}, r"in \(0, 1\]"),
        ({"keep": 1.5}, r"in \(0, 1\]"),
        ({"keep": 0.5, "units": "layers"}, "units must be"),
        ({"keep": 0.5, "units": "branches"}, "needs residual branches"),
    ],
)
def test_macs_budget_rejects_bad_arguments(macs_problems, kwargs, words):
    s, _ = macs_problems["mlp"]
    with pytest.raises(BudgetError, match=words):
        MacsBudget(s, **kwargs)


def test_macs_relax(macs_problems):
    s, params = macs_problems["conv"]
    budget = MacsBudget(s, keep=0.3)
    dense = budget.relax(0.0)
    assert dense.capacity == pytest.approx(s.dense_macs)
    assert all(bool(np.all(m)) for m in jax.tree.leaves(dense.project(params).masks))
    assert budget.relax(1.0).capacity == pytest.approx(budget.capacity)
    assert budget.relax(0.5).capacity == pytest.approx(0.65 * s.dense_macs)
    with pytest.raises(BudgetError, match="keeps whole channels"):
        budget.pricing(params)
    d = budget.describe()
    assert d["type"] == "macs" and d["dense_macs"] == s.dense_macs
    assert d["keep"] == pytest.approx(0.3) and d["reduction"] == pytest.approx(1 / 0.3)


# ---------------------------------------------------------------------------- branches


def _branch_net(bn=False):
    """Three residual blocks ``x + branch(x)`` of different widths inside (models.Residual)."""
    if not hasattr(models, "Residual"):
        pytest.skip("admmprune.models.Residual has not landed yet")

    class Plain(nnx.Module):
        def __init__(self, mid, rngs):
            self.conv_a = nnx.Conv(4, mid, (3, 3), padding="SAME", rngs=rngs)
            self.conv_b = nnx.Conv(mid, 4, (3, 3), padding="SAME", rngs=rngs)

        def __call__(self, x):
            return self.conv_b(jax.nn.relu(self.conv_a(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Conv(2, 4, (3, 3), padding="SAME", rngs=rngs)
            if bn:
                self.block1 = models.Residual(models.Branch(4, 4, rngs=rngs))
                self.block2 = models.Residual(models.Branch(4, 4, rngs=rngs))
                self.block3 = models.Residual(models.Branch(4, 4, rngs=rngs))
            else:
                self.block1 = models.Residual(Plain(2, rngs))
                self.block2 = models.Residual(Plain(3, rngs))
                self.block3 = models.Residual(Plain(5, rngs))
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            h = self.block3(self.block2(self.block1(self.stem(x))))
            return self.head(h.mean(axis=(1, 2)))

    return structure_of(Net, (4, 4, 2))


@pytest.mark.parametrize("keep", [0.2, 0.45, 0.6, 0.75, 1.0])
def test_branch_budget_equals_brute_force_over_branch_subsets(keep):
    s, model = _branch_net()
    params = random_params(model, 11)
    assert [b.name for b in s.branches] == ["block1/branch", "block2/branch", "block3/branch"]
    mids = {"block1/branch": 2, "block2/branch": 3, "block3/branch": 5}
    # stem 16*18*4, each branch 2 * 16*36*mid, head 4*3
    dense = 16 * 18 * 4 + sum(2 * 16 * 36 * m for m in mids.values()) + 12
    assert s.dense_macs == dense
    energy = {
        b.name: sum(float((np.asarray(v, np.float64) ** 2).sum()) for v in _leaves(params, b))
        for b in s.branches
    }
    budget = MacsBudget(s, keep=keep, units="branches")
    budget.check(params)
    best, best_flags = -1.0, None
    for flags in itertools.product((True, False), repeat=3):
        kept = dict(zip(mids, flags, strict=True))
        macs = dense - sum(2 * 16 * 36 * mids[n] for n, k in kept.items() if not k)
        assert s.macs({}, kept) == pytest.approx(macs)
        if macs <= budget.capacity:
            value = sum(energy[n] for n, k in kept.items() if k)
            if value > best:
                best, best_flags = value, kept
    projection = budget.project(params)
    _, alive = s.kept(projection.masks)
    assert alive == best_flags
    assert projection.figures["macs"] == pytest.approx(s.macs_of(projection.masks))
    assert projection.figures["macs"] <= budget.capacity
    for b in s.branches:  # a removed branch is zero whole; a kept one untouched
        for leaf in _leaf_masks(projection.masks, b):
            assert bool(np.all(leaf)) == alive[b.name]
            assert bool(np.any(leaf)) == alive[b.name]
    z = apply_masks(params, projection.masks)
    assert in_budget(z, budget)
    assert budget.measure(z) == pytest.approx(projection.figures)


def test_branch_budget_floor_and_relax():
    s, model = _branch_net()
    params = random_params(model, 2)
    budget = MacsBudget(s, keep=0.05, units="branches")
    floor = 16 * 18 * 4 + 12  # every branch removed
    assert budget.floor() == pytest.approx(floor)
    with pytest.raises(BudgetError, match="with every residual branch removed"):
        budget.check(params)
    relaxed = MacsBudget(s, keep=0.5, units="branches").relax(0.0)
    assert relaxed.capacity == pytest.approx(s.dense_macs)
    assert all(s.kept(relaxed.project(params).masks)[1].values())


def test_branch_energy_ignores_batchnorm_statistics():
    # regression: branch energy once counted BatchNorm running statistics
    s, model = _branch_net(bn=True)
    params = random_params(model, 5)
    for name, w, var in (("block1", 3.0, 1.0), ("block2", 0.1, 1000.0), ("block3", 0.1, 1.0)):
        blk = params[name]["branch"]
        for part in ("conv1", "conv2"):
            blk[part]["kernel"] = blk[part]["kernel"] * w
        for part in ("bn1", "bn2"):
            blk[part]["var"] = np.full_like(blk[part]["var"], var)
            blk[part]["mean"] = np.zeros_like(blk[part]["mean"])
    branch = s.layers[[layer.branch for layer in s.layers].index("block1/branch")].macs * 2
    budget = MacsBudget(s, macs=s.dense_macs - 2 * branch + 1, units="branches")  # keep one
    _, alive = s.kept(budget.project(params).masks)
    assert alive == {"block1/branch": True, "block2/branch": False, "block3/branch": False}


def _leaves(params, branch):
    from admmprune._tree import named_leaves

    flat = named_leaves(params)
    return [flat[n] for n in branch.leaves]


def _leaf_masks(masks, branch):
    return [np.asarray(m) for m in _leaves(masks, branch)]


# ---------------------------------------------------------------------------- NMBudget


def nm_oracle(w, n, m):
    """Per column of the (reduction, out) view: every block of m keeps its n largest |w|,
    ties to the earlier index."""
    flat = np.abs(np.asarray(w)).reshape(-1, np.shape(w)[-1])
    out = np.zeros(flat.shape, bool)
    for col in range(flat.shape[1]):
        for start in range(0, flat.shape[0], m):
            block = flat[start : start + m, col]
            order = sorted(range(m), key=lambda i: (-block[i], i))
            out[start + np.array(order[:n]), col] = True
    return out.reshape(np.shape(w))


def _needs_nm_mask():
    if not hasattr(projections, "nm_mask"):
        pytest.skip("admmprune.projections.nm_mask has not landed yet")


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)])
def test_nm_projection_equals_numpy_oracle(n, m):
    _needs_nm_mask()
    rng = np.random.default_rng(n * 10 + m)
    params = {
        "fc": {"kernel": rng.standard_normal((16, 3)).astype(np.float32), "bias": np.ones(3)},
        "conv": {"kernel": rng.standard_normal((2, 2, 4, 5)).astype(np.float32)},  # HWIO
    }
    # ties: integer magnitudes, so earlier-index-first decides
    params["tie"] = {"kernel": rng.integers(-2, 3, (8, 4)).astype(np.float32)}
    budget = NMBudget(n, m)
    budget.check(params)
    masks = budget.project(params).masks
    for name in ("fc", "conv", "tie"):
        np.testing.assert_array_equal(
            np.asarray(masks[name]["kernel"]), nm_oracle(params[name]["kernel"], n, m)
        )
    assert bool(np.all(masks["fc"]["bias"]))  # 1-D leaves are not constrained
    z = apply_masks(params, masks)
    assert in_budget(z, budget)
    for name in ("fc", "conv"):
        blocks = (np.asarray(z[name]["kernel"]) != 0).reshape(
            -1, m, np.shape(z[name]["kernel"])[-1]
        )
        assert (blocks.sum(1) == n).all()  # Gaussian weights: no zeros among the kept


def test_nm_projection_of_named_layers_only():
    _needs_nm_mask()
    rng = np.random.default_rng(0)
    params = {
        "a": {"kernel": rng.standard_normal((8, 2)).astype(np.float32)},
        "b": {"kernel": rng.standard_normal((6, 2)).astype(np.float32)},  # 6 is not a multiple of 4
    }
    budget = NMBudget(2, 4, layers=("a/kernel",))
    budget.check(params)
    masks = budget.project(params).masks
    np.testing.assert_array_equal(
        np.asarray(masks["a"]["kernel"]), nm_oracle(params["a"]["kernel"], 2, 4)
    )
    assert bool(np.all(masks["b"]["kernel"]))
    assert budget.prunable(params) == [True, False]


def test_nm_check_errors():
    params = {
        "fc": {"kernel": np.zeros((6, 3), np.float32)},
        "conv": {"kernel": np.zeros((3, 3, 1, 4), np.float32)},  # reduction 9
    }
    with pytest.raises(
        BudgetError, match=r"fc/kernel: its reduction size 6 is not a multiple of M=4"
    ):
        NMBudget(2, 4, layers=("fc/kernel",)).check(params)
    with pytest.raises(
        BudgetError, match=r"conv/kernel: its reduction size 9 is not a multiple of M=4"
    ):
        NMBudget(2, 4, layers=("conv/kernel",)).check(params)
    # the default constrains every kernel, so one that M does not tile is an error
    with pytest.raises(BudgetError, match=r"conv/kernel: its reduction size 9 is not a multiple"):
        NMBudget(2, 4).check(params)
    NMBudget(1, 3).check(params)  # 3 divides 6 and 9
    with pytest.raises(BudgetError, match=r"N:M layers \['nope'\] are not leaves"):
        NMBudget(2, 4, layers=("nope",)).check(params)
    for n, m in ((0, 4), (5, 4), (-1, 2)):
        with pytest.raises(BudgetError, match="0 < N <= M"):
            NMBudget(n, m)
    with pytest.raises(BudgetError, match="fixes the kept count of every block"):
        NMBudget(2, 4).pricing(params)
    assert NMBudget(2, 4).relax(0.3) == NMBudget(2, 4)
    assert NMBudget(2, 4).describe() == {"type": "n:m", "n": 2, "m": 4, "layers": []}


# ---------------------------------------------------------------------------- through a solver


def test_magnitude_prune_with_a_channel_budget_compacts_to_the_kept_widths():
    from admmprune.compact import compact

    # the MLP of test_channel_projection_is_in_budget: its projection is compiled already
    s, model = structure_of(MLP, (3,), widths=(4, 3), din=3, dout=2)
    params = jax.tree.map(lambda x: 0.5 * x, random_params(model, 0))
    _, apply = split_nnx(model)
    data = synthetic_classification(128, dim=3, classes=2, seed=0)
    budget = ChannelBudget(s, count=3)
    budget.check(params)
    solver = MagnitudePrune(budget, optax.adam(1e-2), finetune=Finetune(epochs=1), batch_size=32)
    result = solver.run(
        params,
        models.cross_entropy_loss(apply),
        (jnp.asarray(data.x), jnp.asarray(data.y)),
        key=jax.random.key(0),
    )
    assert len(result.records("retrain")) == 1
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), result.params, params)
    assert changed["fc1"]["kernel"]  # it did train
    assert in_budget(result.params, budget)
    channels = s.kept(jax.tree.map(lambda x: x != 0, result.params))[0]
    counts = {k: int(v.sum()) for k, v in channels.items()}
    assert sum(counts.values()) == 3 and min(counts.values()) >= 1
    small, small_params = compact(model, result.params, result.masks, s)
    assert small_params["fc0"]["kernel"].shape == (3, counts["fc0/kernel"])
    assert small_params["fc1"]["kernel"].shape == (counts["fc0/kernel"], counts["fc1/kernel"])
    assert small_params["fc2"]["kernel"].shape == (counts["fc1/kernel"], 2)
    assert small.fc1.in_features == counts["fc0/kernel"]
    assert small.fc1.out_features == counts["fc1/kernel"]
    x = jnp.asarray(data.x[:5])
    _, small_apply = split_nnx(small)
    np.testing.assert_allclose(
        quick_jit(small_apply)(small_params, x),
        quick_jit(apply)(result.params, x),
        rtol=1e-5,
        atol=1e-5,
    )
    assert result.budget == budget.describe()


def test_channel_energy_with_macs_coefficients_is_the_macs_budget():
    """ECC's bilinear model with a_j = layer MACs and b0 = 0 prices exactly the MACs."""
    from admmprune.bilinear import BilinearEnergy
    from admmprune.structured import ChannelEnergyBudget

    model = models.LeNet5(nnx.Rngs(0))
    s = derive(model, (28, 28, 1))
    params, _ = split_nnx(model)
    energy = BilinearEnergy(
        tuple(x.kernel for x in s.layers), 0.0, tuple(float(x.macs) for x in s.layers)
    )
    for keep in (0.3, 0.12):
        a = MacsBudget(s, keep=keep).project(params)
        b = ChannelEnergyBudget(s, keep=keep, model=energy).project(params)
        assert s.kept(a.masks)[0].keys() == s.kept(b.masks)[0].keys()
        for name, kept in s.kept(a.masks)[0].items():
            np.testing.assert_array_equal(kept, s.kept(b.masks)[0][name])
        assert b.figures["energy"] == a.figures["macs"]
    shifted = BilinearEnergy(energy.layers, 1e5, energy.a)
    budget = ChannelEnergyBudget(s, keep=0.5, model=shifted)
    assert budget.describe()["dense_energy"] == s.dense_macs + 1e5
    assert budget.project(params).figures["energy"] <= budget.capacity
    with pytest.raises(BudgetError, match="below the smallest reachable"):
        ChannelEnergyBudget(s, keep=0.01, model=shifted).check(params)
    with pytest.raises(BudgetError, match="does not have"):
        ChannelEnergyBudget(s, keep=0.5, model=BilinearEnergy(("nope",), 0.0, (1.0,)))


def test_fit_channel_energy_recovers_an_exactly_bilinear_energy():
    """Measured by MACs (ECC's model holds exactly), the fit gives a_j = dense MACs_j, b0 = 0."""
    from admmprune.structured import ChannelEnergyBudget, fit_channel_energy

    model = models.LeNet5(nnx.Rngs(0))
    s = derive(model, (28, 28, 1))
    params, _ = split_nnx(model)

    class MacsEnergy:
        def energy(self, masks):
            return s.macs_of(masks) + 1000.0

    energy, fit = fit_channel_energy(s, MacsEnergy(), params, samples=24, seed=3)
    dense = {x.kernel: x.macs for x in s.layers}
    assert energy.layers == tuple(dense)
    np.testing.assert_allclose(energy.a, list(dense.values()), rtol=1e-6)
    np.testing.assert_allclose(energy.b0, 1000.0, rtol=1e-6)
    assert fit.r2 > 1 - 1e-9 and fit.samples == 24
    budget = ChannelEnergyBudget(s, keep=0.3, model=energy, fit=fit)
    assert budget.describe()["fit"]["samples"] == 24
    projected = budget.project(params)
    assert MacsEnergy().energy(s.masks(params, s.kept(projected.masks)[0])) <= budget.capacity
    with pytest.raises(BudgetError, match="use at least"):
        fit_channel_energy(s, MacsEnergy(), params, samples=3)


# ---------------------------------------------------------------------------- round_to


def brute_rounded(structure, energy, capacity, round_to, floor=1):
    """brute_counts over the counts a rounded MacsBudget allows (multiples, or all)."""
    names = [g.name for g in structure.groups]
    ranked = {n: np.sort(np.asarray(energy[n], np.float64))[::-1] for n in names}
    least = {g.name: min(g.size, -(-floor // round_to) * round_to) for g in structure.groups}
    ranges = [
        [k for k in range(least[g.name], g.size + 1) if k % round_to == 0 or k == g.size]
        for g in structure.groups
    ]
    best, arg = -1.0, None
    for counts in itertools.product(*ranges):
        c = dict(zip(names, counts, strict=True))
        if structure.macs(c) <= capacity:
            v = sum(float(ranked[n][:k].sum()) for n, k in c.items())
            if v > best:
                best, arg = v, c
    return best, arg


@pytest.mark.parametrize("name", ["mlp", "mlp3", "conv", "residual"])
@pytest.mark.parametrize("round_to", [2, 3])
@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_macs_round_to_exact_is_brute_force_greedy_is_feasible(macs_problems, name, round_to, t):
    s, params = macs_problems[name]
    energy = s.scores(params)
    for exact in (True, False):
        budget = MacsBudget(s, keep=1.0, round_to=round_to, exact=exact)
        floor = budget.floor()
        budget = MacsBudget(
            s, macs=floor + t * (s.dense_macs - floor), round_to=round_to, exact=exact
        )
        budget.check(params)
        best, _ = brute_rounded(s, energy, budget.capacity, round_to)
        keep = s.kept(budget.project(params).masks)[0]
        counts = {k: int(v.sum()) for k, v in keep.items()}
        sizes = {g.name: g.size for g in s.groups}
        assert all(c % round_to == 0 or c == sizes[k] for k, c in counts.items()), counts
        assert s.macs(counts) <= budget.capacity + 1e-9
        value = kept_value(s, energy, keep)
        if exact:
            assert value == pytest.approx(best, rel=1e-6)
        else:
            assert value <= best * (1 + 1e-6)


def test_macs_round_to_one_is_the_unrounded_budget(macs_problems):
    s, params = macs_problems["conv"]
    for keep in (0.3, 0.6):
        a = MacsBudget(s, keep=keep).project(params).masks
        b = MacsBudget(s, keep=keep, round_to=1).project(params).masks
        assert all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )


def test_macs_round_to_floor_and_errors(macs_problems):
    s, params = macs_problems["conv"]  # conv1 5 channels, conv2 4
    budget = MacsBudget(s, keep=1.0, round_to=4)
    assert budget.least(5) == 4 and budget.least(3) == 3
    assert list(budget.allowed(5)) == [4, 5]
    assert budget.floor() == pytest.approx(s.macs({"conv1/kernel": 4, "conv2/kernel": 4}))
    with pytest.raises(BudgetError, match="rounded up to a multiple of 4"):
        MacsBudget(s, macs=budget.floor() - 1, round_to=4).check(params)
    with pytest.raises(BudgetError, match="round_to must be at least 1"):
        MacsBudget(s, keep=0.5, round_to=0)
    assert MacsBudget(s, keep=0.5, round_to=4).describe()["round_to"] == 4
    assert "round_to" not in MacsBudget(s, keep=0.5).describe()
