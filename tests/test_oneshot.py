"""One-shot pruning: allocation against brute force, WoodFisher against a direct inverse,
budgets met on a small MLP, OBS compensation of a fixed mask."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from admmprune import ADMM, Finetune, GeometricRho, ParamBudget, obs
from admmprune.budgets import BudgetError
from admmprune.data import synthetic_classification
from admmprune.energy import LayerCost, LinearEnergy
from admmprune.energy_budget import EnergyBudget
from admmprune.models import accuracy, cross_entropy_loss, split_nnx
from admmprune.oneshot import OneShotPrune, allocate, count_grid
from admmprune.training import train
from admmprune.woodfisher import _flat_prunable, _per_example_grads, fisher_inverse_blocks


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(16, 24, rngs=rngs)
        self.fc2 = nnx.Linear(24, 12, rngs=rngs)
        self.fc3 = nnx.Linear(12, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc3(jax.nn.relu(self.fc2(x)))


@pytest.fixture(scope="module")
def trained():
    data = synthetic_classification(1024, dim=16, classes=4, seed=3)
    model = MLP(nnx.Rngs(0))
    params, apply = split_nnx(model)
    loss = cross_entropy_loss(apply)
    params, _ = train(
        params,
        loss,
        (data.x, data.y),
        optimizer=optax.adam(3e-3),
        epochs=15,
        batch_size=64,
        key=jax.random.key(0),
    )
    return model, params, apply, loss, (data.x, data.y)


def test_allocation_matches_brute_force_over_the_grid():
    rng = np.random.default_rng(0)
    curves = {}
    for name, size in (("a", 40), ("b", 25), ("c", 10)):
        ks = count_grid(size, points=6)
        errs = np.sort(rng.random(len(ks)))[::-1]  # decreasing in kept count
        errs[-1] = 0.0
        curves[name] = (ks, errs)
    capacity = 31.0
    got = allocate(curves, lambda _n, k: k, capacity)
    assert sum(got.values()) == 31  # the grid's slack is handed out: the budget is met

    def value(name: str, k: float) -> float:
        ks, es = curves[name]
        return float(np.interp(k, ks, es))

    best = min(
        sum(curves[n][1][i] for n, i in zip(curves, pick, strict=True))
        for pick in itertools.product(*(range(len(c[0])) for c in curves.values()))
        if sum(curves[n][0][i] for n, i in zip(curves, pick, strict=True)) <= capacity
    )
    assert sum(value(n, k) for n, k in got.items()) <= best + 1e-12


def test_allocation_below_the_floor_says_the_floor():
    curves = {"a": (np.array([0, 5, 10]), np.array([1.0, 0.5, 0.0]))}
    with pytest.raises(BudgetError, match="at least 100"):
        allocate(curves, lambda _n, k: 100.0 + k, 50.0)


def test_woodbury_blocks_equal_the_inverse_of_the_damped_fisher(trained):
    _, params, _, loss, (x, y) = trained
    flags = [leaf.ndim > 1 for leaf in jax.tree.leaves(params)]
    n, block, damp = 96, 32, 1e-2
    finv = np.asarray(
        fisher_inverse_blocks(loss, params, flags, (x[:n], y[:n]), block=block, damp=damp, chunk=16)
    )
    g = np.asarray(_per_example_grads(loss, params, flags, x[:n], y[:n]), np.float64)
    size = g.shape[1]
    lam = damp * np.mean(np.sum(g**2, axis=0) / n)
    g = np.pad(g, ((0, 0), (0, finv.shape[0] * block - size)))
    for b in (0, 3, finv.shape[0] - 1):
        gb = g[:, b * block : (b + 1) * block]
        f = lam * np.eye(block) + gb.T @ gb / n
        np.testing.assert_allclose(finv[b], np.linalg.inv(f), rtol=1e-6, atol=1e-6 / lam)
    assert _flat_prunable(params, flags)[0].size == size


@pytest.mark.parametrize("method", ["magnitude", "wanda", "refit", "fast_obs", "exact_obs"])
def test_uniform_budget_met_exactly_per_layer(trained, method):
    model, params, _apply, loss, data = trained
    budget = ParamBudget(keep=0.25, allocation="uniform")
    res = OneShotPrune(budget, model, method=method, block=8).run(
        params, loss, data, key=jax.random.key(1)
    )
    want = {g.leaves[0]: g.k for g in budget.resolve(params)}
    masks = jax.tree.leaves(res.masks)
    for i, k in want.items():
        assert int(masks[i].sum()) == k
    for p, m in zip(jax.tree.leaves(res.params), masks, strict=True):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0)


def test_obs_beats_magnitude_one_shot(trained):
    model, params, _apply, loss, data = trained
    budget = ParamBudget(keep=0.2, allocation="uniform")

    def loss_after(method: str) -> float:
        res = OneShotPrune(budget, model, method=method, block=8).run(
            params, loss, data, key=jax.random.key(1)
        )
        return float(loss(res.params, data))

    assert loss_after("exact_obs") < loss_after("magnitude")
    assert loss_after("fast_obs") < loss_after("magnitude")


def test_allocation_meets_a_global_parameter_budget_exactly(trained):
    model, params, _, loss, data = trained
    budget = ParamBudget(count=150)
    res = OneShotPrune(budget, model, method="exact_obs", allocation="obs", curve_points=8).run(
        params, loss, data, key=jax.random.key(1)
    )
    assert res.nonzero_weights <= 150
    assert int(sum(int(m.sum()) for m in jax.tree.leaves(res.masks) if m.ndim > 1)) == 150


def _mlp_energy() -> LinearEnergy:
    """A linear energy model of the test MLP: fc3's weights cost most, fc2's least."""
    return LinearEnergy(
        (
            LayerCost("fc1/kernel", 50.0, 3.0, 3.0, 0.0, 16 * 24),
            LayerCost("fc2/kernel", 20.0, 1.0, 1.0, 0.0, 24 * 12),
            LayerCost("fc3/kernel", 5.0, 10.0, 10.0, 0.0, 12 * 4),
        )
    )


def test_allocation_meets_an_energy_budget(trained):
    model, params, _, loss, data = trained
    energy = _mlp_energy()
    budget = EnergyBudget(energy, fraction=0.3)
    res = OneShotPrune(budget, model, method="fast_obs", allocation="obs", curve_points=8).run(
        params, loss, data, key=jax.random.key(1)
    )
    assert energy.energy(res.masks) <= budget.target() * (1 + 1e-9)
    assert energy.energy(res.masks) >= 0.9 * budget.target()


def test_global_obs_meets_the_count_and_beats_global_magnitude(trained):
    model, params, _apply, loss, data = trained
    budget = ParamBudget(count=120)
    res = OneShotPrune(
        budget, model, method="global_obs", fisher_block=32, fisher_examples=256, fisher_steps=2
    ).run(params, loss, data, key=jax.random.key(1))
    assert res.nonzero_weights == 120
    mag = OneShotPrune(budget, model, method="magnitude").run(
        params, loss, data, key=jax.random.key(1)
    )
    assert float(loss(res.params, data)) < float(loss(mag.params, data))


def test_global_obs_refuses_an_energy_budget(trained):
    model, params, _, loss, data = trained
    energy = LinearEnergy((LayerCost("fc1/kernel", 0.0, 1.0, 1.0, 0.0, 384),))
    solver = OneShotPrune(EnergyBudget(energy, fraction=0.5), model, method="global_obs")
    with pytest.raises(ValueError, match="parameter budget"):  # asked of the budget's pricing
        solver.run(params, loss, data, key=jax.random.key(0))


def test_compensated_hard_prune_fits_the_unpruned_outputs_better(trained):
    model, params, apply, loss, data = trained
    x = data[0][:512]
    masks = ParamBudget(keep=0.2, allocation="uniform").mask(params)
    zeroed = jax.tree.map(lambda p, m: jnp.where(m, p, 0.0), params, masks)
    fixed = obs.compensator(model, x)(params, masks)
    for p, m in zip(jax.tree.leaves(fixed), jax.tree.leaves(masks), strict=True):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
    dense_out = apply(params, x)

    def gap(p):
        return float(jnp.sum((apply(p, x) - dense_out) ** 2))

    assert gap(fixed) < gap(zeroed)
    # ...and ADMM with the OBS hard prune records both accuracies.
    solver = ADMM(
        rho=1e-3,  # the constant penalty these figures were set with
        budget=ParamBudget(keep=0.2),
        optimizer=optax.adam(1e-3),
        iterations=2,
        finetune=Finetune(epochs=1, compensate=obs.compensator(model, x)),
        batch_size=64,
    )
    ev = {"accuracy": lambda p: accuracy(apply, p, *data)}
    res = solver.run(
        params,
        loss,
        data,
        key=jax.random.key(0),
        eval_fn=lambda p: {k: f(p) for k, f in ev.items()},
    )
    prune = next(r for r in res.history if r["phase"] == "prune")
    assert "zeroed_accuracy" in prune and "accuracy" in prune


def test_admm_with_an_obs_allocation_keeps_its_counts_and_the_energy_budget(trained, checkpoint_at):
    """ADMM on obs_allocation(...)(params): the Z-step and the hard prune keep exactly the
    allocated count in every layer; the counts are the one-shot allocation's; the energy
    budget holds; the description is the energy budget's plus the counts; a resumed run
    ends bit-identical."""
    from admmprune import LayerAllocation, load_checkpoint, obs_allocation

    model, params, _, loss, data = trained
    energy = _mlp_energy()
    budget = EnergyBudget(energy, fraction=0.3)
    x = data[0][:256]
    allocate_fn = obs_allocation(budget, model, x, curve_points=8)
    allocated = allocate_fn(params)
    assert isinstance(allocated, LayerAllocation)
    want = OneShotPrune(budget, model, allocation="obs", curve_points=8).counts(params, x)
    assert dict(allocated.counts) == want
    solver = ADMM(
        allocated, optax.adam(3e-3), rho=GeometricRho(1e-2, 1.3), iterations=4,
        finetune=Finetune(epochs=1), batch_size=64,
    )  # fmt: skip
    keep_second, saved = checkpoint_at(2)
    res = solver.run(params, loss, data, key=jax.random.key(2), on_iteration=keep_second)
    kept = {n: int(res.masks[n]["kernel"].sum()) for n in ("fc1", "fc2", "fc3")}
    assert kept == {n.split("/")[0]: k for n, k in want.items()}
    assert energy.energy(res.masks) <= budget.target() * (1 + 1e-9)
    assert res.budget == {**budget.describe(), "allocation": want}
    assert "energy_fraction" in res.records("admm")[-1]  # the parent's figures for Z
    state = load_checkpoint(saved["path"], solver.init(params, jax.random.key(0)))
    again = solver.run(
        params, loss, data, key=jax.random.key(2), state=state, history=saved["history"]
    )
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
