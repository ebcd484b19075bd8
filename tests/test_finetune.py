"""The Finetune stage: hard prune, compensation that cannot revive weights, masked retraining."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admmprune import Finetune, ParamBudget


def _problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 128), jnp.int32)
    params = {"w": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}

    def loss(p, batch):
        xb, yb = batch
        return optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"], yb).mean()

    return params, loss, (x, y)


def test_prune_compensate_and_retrain_keep_the_mask():
    params, loss, data = _problem()
    masks = ParamBudget(count=6).mask(params)

    def compensate(p, m):  # moves every weight, pruned ones too: the stage must re-mask
        return jax.tree.map(lambda a: a + 1.0, p)

    seen = []
    stage = Finetune(epochs=2, compensate=compensate)
    out, history = stage.run(
        params, masks, loss, data, key=jax.random.key(0), record={"phase": "prune"},
        optimizer=optax.adam(1e-2), batch_size=32,
        eval_fn=lambda p: {"nonzero": float(np.count_nonzero(np.asarray(p["w"])))},
        callback=seen.append,
    )  # fmt: skip
    m = np.asarray(masks["w"])
    assert np.all(np.asarray(out["w"])[~m] == 0.0)
    assert [r["phase"] for r in history] == ["prune", "retrain", "retrain"]
    assert history[0]["zeroed_nonzero"] == 6.0 and history[0]["nonzero"] == 6.0
    assert seen == history  # every record reaches the callback once, in order


def test_no_retraining_returns_the_pruned_weights_and_one_record():
    params, loss, data = _problem()
    masks = ParamBudget(count=4).mask(params)
    out, history = Finetune().run(
        params, masks, loss, data, key=jax.random.key(0), record={"phase": "prune"}
    )
    np.testing.assert_array_equal(
        np.asarray(out["w"]), np.where(np.asarray(masks["w"]), np.asarray(params["w"]), 0.0)
    )
    assert history == [{"phase": "prune"}]


def test_bad_settings_are_rejected():
    params, loss, data = _problem()
    with pytest.raises(ValueError, match="non-negative integer"):
        Finetune(epochs=-1)
    masks = ParamBudget(count=4).mask(params)
    with pytest.raises(ValueError, match="needs an optimizer"):
        Finetune(epochs=1).run(params, masks, loss, data, key=jax.random.key(0), record={})
