"""The nnx adapter: params with BatchNorm statistics, train/eval modes, recalibration."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admmprune.nnx import (
    batch_stats_calibrator,
    calibrate_batch_stats,
    has_batch_stats,
    merge_nnx,
    split_nnx,
)


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc = nnx.Linear(5, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.bn(self.fc(x))))


def test_split_carries_batch_stats_and_modes() -> None:
    model = Net(nnx.Rngs(0))
    params, train_apply = split_nnx(model, train=True)
    assert sorted(params["bn"]) == ["bias", "mean", "scale", "var"]
    _, eval_apply = split_nnx(model, train=False)
    x = jax.random.normal(jax.random.key(1), (64, 5))
    # Eval mode uses the stored statistics (mean 0, var 1 at init); train mode the batch's.
    h = x @ params["fc"]["kernel"] + params["fc"]["bias"]
    manual = jax.nn.relu(h / jnp.sqrt(1 + 1e-5)) @ params["out"]["kernel"] + params["out"]["bias"]
    np.testing.assert_allclose(eval_apply(params, x), manual, atol=1e-5)
    assert not np.allclose(train_apply(params, x), eval_apply(params, x), atol=1e-3)
    # The module itself is not switched.
    assert model.bn.use_running_average is False
    back = merge_nnx(model, jax.tree.map(lambda a: a + 1.0, params))
    assert float(back.bn.var[...][0]) == 2.0


def test_calibration_measures_population_statistics() -> None:
    model = Net(nnx.Rngs(0))
    params, _ = split_nnx(model)
    x = jax.random.normal(jax.random.key(2), (1000, 5)) * 3 + 1
    calibrated = calibrate_batch_stats(model, params, x, batch_size=250)
    h = np.asarray(x @ params["fc"]["kernel"] + params["fc"]["bias"], np.float64)
    np.testing.assert_allclose(calibrated["bn"]["mean"], h.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(calibrated["bn"]["var"], h.var(0), rtol=1e-4, atol=1e-5)
    # Weights untouched; with population statistics, eval mode on the whole set matches
    # train mode on it (one batch of everything).
    np.testing.assert_array_equal(calibrated["fc"]["kernel"], params["fc"]["kernel"])
    _, train_apply = split_nnx(model, train=True)
    _, eval_apply = split_nnx(model, train=False)
    np.testing.assert_allclose(
        eval_apply(calibrated, x), train_apply(calibrated, x), rtol=1e-4, atol=1e-4
    )
    again = batch_stats_calibrator(model, batch_size=250)
    np.testing.assert_allclose(again(params, x)["bn"]["var"], calibrated["bn"]["var"])


def test_model_without_batchnorm_is_returned_as_is() -> None:
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params, _ = split_nnx(model)
    assert not has_batch_stats(model)
    assert calibrate_batch_stats(model, params, jnp.ones((4, 3))) is params
