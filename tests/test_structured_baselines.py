"""L1-filter pruning, network slimming and structured one-shot OBS on tiny networks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from admmprune import Finetune, in_budget
from admmprune.compact import compact
from admmprune.groups import derive, kept_counts
from admmprune.models import cross_entropy_loss
from admmprune.nnx import split_nnx
from admmprune.structured import ChannelBudget, MacsBudget
from admmprune.structured_baselines import (
    L1FilterPrune,
    NetworkSlimming,
    StructuredOBS,
    norm_scales,
    obs_channel_costs,
)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, bn: bool = False) -> None:
        self.a = nnx.Linear(8, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, rngs=rngs) if bn else None
        self.b = nnx.Linear(6, 5, rngs=rngs)
        self.c = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.a(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.c(jax.nn.relu(self.b(jax.nn.relu(h))))


def _data(n: int = 256) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(0), (n, 8))
    y = jnp.argmax(x[:, :3], axis=1).astype(jnp.int32)
    return x, y


def test_obs_channel_costs_equal_least_squares_refit() -> None:
    """Removing channel c and refitting the next layer raises its error by exactly the cost."""
    model = MLP(nnx.Rngs(0))
    params, _ = split_nnx(model)
    structure = derive(model, (8,))
    x, _ = _data(300)
    costs = obs_channel_costs(structure, model, params, x, damp=0.0)
    h = np.asarray(jax.nn.relu(x @ params["a"]["kernel"] + params["a"]["bias"]), np.float64)
    w = np.asarray(params["b"]["kernel"], np.float64)
    y = h @ w
    for c in range(6):
        rest = [i for i in range(6) if i != c]
        fit, *_ = np.linalg.lstsq(h[:, rest], y, rcond=None)
        brute = np.sum((y - h[:, rest] @ fit) ** 2) / x.shape[0]
        np.testing.assert_allclose(float(costs["a/kernel"][c]), brute, rtol=1e-4, atol=1e-7)


def test_l1_filter_keeps_largest_l1_channels_and_fits_budget() -> None:
    model = MLP(nnx.Rngs(1))
    params, apply = split_nnx(model)
    structure = derive(model, (8,))
    budget = ChannelBudget(structure, per_layer={"a/kernel": 2, "b/kernel": 3})
    solver = L1FilterPrune(budget, optax.adam(1e-3), Finetune(epochs=1), batch_size=32)
    result = solver.run(params, cross_entropy_loss(apply), _data(), key=jax.random.key(0))
    assert kept_counts(structure, result.masks) == {"a/kernel": 2, "b/kernel": 3}
    l1 = np.abs(np.asarray(params["a"]["kernel"])).sum(0)
    kept = np.flatnonzero(np.asarray(result.masks["a"]["bias"]))
    assert set(kept) == set(np.argsort(-l1)[:2])
    assert in_budget(result.params, budget)
    assert result.method == "l1_filter"


def test_network_slimming_ranks_by_batchnorm_scale() -> None:
    model = MLP(nnx.Rngs(2), bn=True)
    params, apply = split_nnx(model)
    structure = derive(model, (8,))
    budget = ChannelBudget(structure, per_layer={"a/kernel": 3})
    scales = norm_scales(budget, params)
    assert scales["a/kernel"] == ["bn/scale"]
    solver = NetworkSlimming(
        budget, optax.adam(1e-2), sparsity_epochs=2, l1=1e-2, finetune=Finetune(1), batch_size=32
    )
    result = solver.run(params, cross_entropy_loss(apply), _data(), key=jax.random.key(0))
    assert kept_counts(structure, result.masks)["a/kernel"] == 3
    assert [r["phase"] for r in result.history][:2] == ["sparsity", "sparsity"]
    assert result.epochs == 3
    # The compact network computes what the masked one does.
    small, small_params = compact(model, result.params, result.masks, structure)
    _, big = split_nnx(model, train=False)
    _, little = split_nnx(small, train=False)
    x = _data(16)[0]
    np.testing.assert_allclose(big(result.params, x), little(small_params, x), atol=1e-5)


def test_network_slimming_needs_batchnorm() -> None:
    model = MLP(nnx.Rngs(2))
    params, apply = split_nnx(model)
    budget = ChannelBudget(derive(model, (8,)), keep=0.5)
    solver = NetworkSlimming(budget, optax.adam(1e-3), sparsity_epochs=1, batch_size=32)
    with pytest.raises(ValueError, match="BatchNorm"):
        solver.run(params, cross_entropy_loss(apply), _data(), key=jax.random.key(0))


def test_structured_obs_meets_macs_budget_and_refits_next_layer() -> None:
    model = MLP(nnx.Rngs(3))
    params, apply = split_nnx(model)
    structure = derive(model, (8,))
    budget = MacsBudget(structure, keep=0.5)
    solver = StructuredOBS(budget, model, optax.adam(1e-3), calibration_examples=200)
    result = solver.run(params, cross_entropy_loss(apply), _data(), key=jax.random.key(0))
    assert structure.macs_of(result.masks) <= budget.capacity
    # The next layer's kept weights moved (refit), the first layer's kept columns did not.
    kept_a = np.asarray(result.masks["a"]["kernel"])
    np.testing.assert_array_equal(
        np.asarray(result.params["a"]["kernel"])[kept_a], np.asarray(params["a"]["kernel"])[kept_a]
    )
    kept_b = np.asarray(result.masks["b"]["kernel"])
    if not kept_b.all():
        assert not np.allclose(
            np.asarray(result.params["b"]["kernel"])[kept_b],
            np.asarray(params["b"]["kernel"])[kept_b],
        )
    assert in_budget(result.params, budget)
