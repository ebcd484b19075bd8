"""Splitting metrics: the Euclidean identity, Fisher weights normalized, checkpoint shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from admmprune.metrics import METRICS, DiagFisher, Euclidean, Fisher, scaled


def _loss(p, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ p["w"] - y) ** 2)


def _setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 5)) * np.arange(1, 6), jnp.float32)
    y = jnp.asarray(rng.standard_normal((64, 1)), jnp.float32)
    params = {"w": jnp.asarray(rng.standard_normal((5, 1)), jnp.float32), "b": jnp.zeros(1)}
    return params, (x, y)


def test_euclidean_is_the_identity():
    params, data = _setup()
    assert Euclidean().weights(params, _loss, data, jax.random.key(0), [True, False]) is None
    assert scaled(params, None) is params
    assert Euclidean().like(params) is None


@pytest.mark.parametrize("metric", [Fisher(examples=64), DiagFisher(examples=64)])
def test_fisher_weights_average_one_over_prunable_weights(metric):
    params, data = _setup()
    flags = [False, True]  # leaves in order: b, w
    d = metric.weights(params, _loss, data, jax.random.key(0), flags)
    w = np.broadcast_to(np.asarray(d["w"]), (5, 1))
    assert w.mean() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(d["b"]), 1.0)  # not prunable: weight 1
    like = metric.like(params)
    assert jax.tree.structure(like) == jax.tree.structure(d)
    assert [np.shape(a) for a in jax.tree.leaves(like)] == [np.shape(a) for a in jax.tree.leaves(d)]
    if isinstance(metric, DiagFisher):  # inputs of growing scale: larger Fisher per weight
        assert np.all(np.diff(w[:, 0]) > 0)


def test_scaled_multiplies_by_the_root_of_the_weights():
    params, _ = _setup()
    d = {"w": jnp.full((5, 1), 4.0), "b": jnp.ones(1)}
    np.testing.assert_allclose(np.asarray(scaled(params, d)["w"]), 2 * np.asarray(params["w"]))


def test_bad_settings_and_the_recipe_names():
    with pytest.raises(ValueError, match="metric_examples"):
        Fisher(examples=0)
    with pytest.raises(ValueError, match="metric_damp"):
        DiagFisher(damp=-1.0)
    assert {k: v().name for k, v in METRICS.items()} == {
        "euclidean": "euclidean", "fisher": "fisher", "diag_fisher": "diag_fisher"
    }  # fmt: skip
