"""Compact export (admmprune.compact): slicing, the saved artifact, the latency figures."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

from admmprune import apply_masks
from admmprune.compact import (
    compact,
    compare_latency,
    kept_indices,
    latency,
    load_compact,
    save_compact,
)
from admmprune.groups import Member, StructureError, derive
from admmprune.nnx import split_nnx


class BNMLP(nnx.Module):
    """6 -> 5 -> BatchNorm -> relu -> 4 -> relu -> 3."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 5, rngs=rngs)
        self.bn1 = nnx.BatchNorm(5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 4, rngs=rngs)
        self.fc3 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.fc1(x)))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x)


def build(cls, seed=0):
    """``cls`` in eval mode with Gaussian params (flax's initializers never run)."""
    abstract = nnx.eval_shape(lambda: cls(nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
    pure = nnx.to_pure_dict(state)
    rng = np.random.default_rng(seed)
    values = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        if str(path[-1].key) == "var":
            values.append(rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32))
        else:
            values.append((0.5 * rng.standard_normal(leaf.shape)).astype(np.float32))
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(jax.tree.structure(pure), values))
    model = nnx.merge(graphdef, state, rest)
    model.eval()
    return model


KEEP = {
    "fc1/kernel": np.array([True, False, True, True, False]),
    "fc2/kernel": np.array([False, True, True, False]),
}


@pytest.fixture(scope="module")
def pruned():
    """(model, structure, params, masks, compact model, compact params) for BNMLP."""
    model = build(BNMLP)
    s = derive(model, (6,))
    params, _ = split_nnx(model, train=False)
    masks = s.masks(params, KEEP)
    small, small_params = compact(model, params, masks, s)
    return model, s, params, masks, small, small_params


def x_of(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)


def test_compact_slices_every_member(pruned):
    model, s, params, _, small, small_params = pruned
    k1, k2 = np.flatnonzero(KEEP["fc1/kernel"]), np.flatnonzero(KEEP["fc2/kernel"])
    expected = {
        "fc1": {"kernel": params["fc1"]["kernel"][:, k1], "bias": params["fc1"]["bias"][k1]},
        "bn1": {n: params["bn1"][n][k1] for n in ("scale", "bias", "mean", "var")},
        "fc2": {
            "kernel": np.asarray(params["fc2"]["kernel"])[np.ix_(k1, k2)],
            "bias": params["fc2"]["bias"][k2],
        },
        "fc3": {"kernel": params["fc3"]["kernel"][k2], "bias": params["fc3"]["bias"]},
    }
    for got, want in zip(jax.tree.leaves(small_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert (small.fc1.in_features, small.fc1.out_features) == (6, 3)
    assert small.bn1.num_features == 3
    assert (small.fc2.in_features, small.fc2.out_features) == (3, 2)
    assert (small.fc3.in_features, small.fc3.out_features) == (2, 3)
    # the original network is untouched
    assert model.fc1.kernel.shape == (6, 5) and model.bn1.num_features == 5
    idx = kept_indices(s, params, pruned[3])
    np.testing.assert_array_equal(idx["fc2/kernel"][0], k1)
    np.testing.assert_array_equal(idx["fc2/kernel"][1], k2)
    assert idx["fc1/kernel"][0] is None and idx["fc3/bias"] == [None]


def test_compact_from_nonzero_pattern_equals_compact_from_masks(pruned):
    # a solver's result: the masks are just where the pruned params are nonzero
    model, s, params, masks, _, small_params = pruned
    z = apply_masks(params, masks)
    _, from_nonzero = compact(model, z, jax.tree.map(lambda a: a != 0, z), s)
    for a, b in zip(jax.tree.leaves(from_nonzero), jax.tree.leaves(small_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compact_raises_when_a_group_has_no_channel_left(pruned):
    model, s, params, _, _, _ = pruned
    masks = s.masks(params, {"fc2/kernel": np.zeros(4, bool)})
    with pytest.raises(StructureError, match=r"group 'fc2/kernel' has no channel left"):
        compact(model, params, masks, s)


def test_compact_checks_the_structure_fits(pruned):
    model, _, params, masks, _, _ = pruned
    s = derive(model, (6,))
    other = dataclasses.replace(
        s, groups=(dataclasses.replace(s.groups[0], producers=(Member("fc9/kernel", 1),)),)
    )
    with pytest.raises(StructureError, match=r"names leaf 'fc9/kernel'"):
        compact(model, params, masks, other)


def test_compact_rejects_the_structure_of_another_model(pruned):
    # regression: Structure.check once accepted this; kept() then raised a numpy ValueError
    model, _, params, masks, _, _ = pruned
    other = derive(nnx.eval_shape(lambda: _Wider(nnx.Rngs(0))), (6,))  # fc1 has 7 channels
    with pytest.raises(StructureError):
        compact(model, params, masks, other)


class _Wider(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 7, rngs=rngs)
        self.bn1 = nnx.BatchNorm(7, rngs=rngs)
        self.fc2 = nnx.Linear(7, 4, rngs=rngs)
        self.fc3 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.fc1(x)))
        return self.fc3(jax.nn.relu(self.fc2(x)))


def test_compact_emits_no_warning(pruned):
    # a regression test: compact() once set leaves through flax's deprecated
    # ``Variable.value =`` (a DeprecationWarning on flax 0.12)
    model, s, params, masks, _, _ = pruned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compact(model, params, masks, s)


def test_save_and_load_round_trip(pruned, tmp_path):
    *_, small, small_params = pruned
    paths = save_compact(tmp_path / "out", small, small_params, (6,), info={"note": "bnmlp"})
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "compact.npz",
        "compact.json",
        "compact.jaxexport",
    ]
    meta = json.loads((tmp_path / "out" / "compact.json").read_text())
    assert meta["input_shape"] == [6] and meta["note"] == "bnmlp"
    assert meta["leaves"]["fc2/kernel"] == [3, 2]
    assert meta["leaves"]["bn1/var"] == [3]
    f, loaded = load_compact(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(small_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, small_apply = split_nnx(small, train=False)
    for n in (1, 5):  # the batch axis is symbolic
        x = x_of(n, seed=n)
        np.testing.assert_allclose(f(x), small_apply(small_params, x), rtol=1e-6, atol=1e-6)


def test_compare_latency_reports_every_batch(pruned):
    model, _, params, _, small, small_params = pruned
    _, apply = split_nnx(model, train=False)
    _, small_apply = split_nnx(small, train=False)
    out = compare_latency(
        (apply, params), (small_apply, small_params), (6,), batches=(4, 1), repeats=1, rounds=1
    )
    assert set(out) == {"batch_4", "batch_1"}
    for row in out.values():
        assert set(row) == {"dense_seconds", "compact_seconds", "speedup"}
        assert all(math.isfinite(v) and v > 0 for v in row.values())
        assert row["speedup"] == pytest.approx(row["dense_seconds"] / row["compact_seconds"])
    assert latency(small_apply, small_params, x_of(2), repeats=1) > 0


def test_compare_latency_times_each_convolution_form_and_picks_the_fastest(monkeypatch):
    import admmprune.compact as compact_module
    from admmprune.models import LeNet5

    traced = []
    real = compact_module.latency

    def spy(apply, params, x, *, repeats=20):
        traced.append(str(jax.make_jaxpr(apply)(params, x)))
        return real(apply, params, x, repeats=repeats)

    monkeypatch.setattr(compact_module, "latency", spy)
    params, apply = split_nnx(LeNet5(nnx.Rngs(0)), train=False)
    out = compare_latency(
        (apply, params),
        (apply, params),
        (28, 28, 1),
        batches=(2,),
        repeats=1,
        rounds=1,
        impls=("im2col", "xla"),
    )
    assert set(out) == {"batch_2", "by_impl", "best"}
    assert out["batch_2"] == out["by_impl"]["im2col"]["batch_2"]
    # the first two timings trace im2col, the last two XLA's convolution
    assert ["conv_general_dilated" in t for t in traced] == [False, False, True, True]
    best = out["best"]["batch_2"]
    runs = out["by_impl"]
    assert best["dense_seconds"] == min(r["batch_2"]["dense_seconds"] for r in runs.values())
    assert best["compact_seconds"] == min(r["batch_2"]["compact_seconds"] for r in runs.values())
    assert best["speedup"] == pytest.approx(best["dense_seconds"] / best["compact_seconds"])
