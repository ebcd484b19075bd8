"""ADMM on problems with known answers; masked retraining; baselines; resume."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import admmprune
from admmprune import (
    ADMM,
    BudgetRamp,
    DiagFisher,
    Finetune,
    Fisher,
    GeometricRho,
    IterativeMagnitudePrune,
    MagnitudePrune,
    ParamBudget,
    load_checkpoint,
    project,
    save_checkpoint,
)


def _sparse_least_squares(seed: int = 0, n: int = 40, d: int = 80, support: int = 5):
    """Compressed sensing: y = X w* with a ``support``-sparse w* and n < d Gaussian rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    w_star = np.zeros(d)
    idx = rng.choice(d, support, replace=False)
    w_star[idx] = rng.choice([-1, 1], support) * rng.uniform(1.0, 2.0, support)
    data = (jnp.asarray(x, jnp.float32), jnp.asarray(x @ w_star, jnp.float32))
    return data, w_star


def _ls_loss(params, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ params["w"][:, 0] - y) ** 2)


def _dense_start(data):
    """The minimum-norm least-squares fit: dense, and its largest entries are misleading."""
    x, y = (np.asarray(a, np.float64) for a in data)
    w = np.linalg.lstsq(x, y, rcond=None)[0]
    return {"w": jnp.asarray(w[:, None], jnp.float32)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_admm_recovers_the_support_of_a_sparse_least_squares_problem(seed):
    data, w_star = _sparse_least_squares(seed)
    start = _dense_start(data)
    support = set(np.flatnonzero(w_star))
    # One-shot magnitude pruning of the start misses the support: the problem is not trivial.
    assert set(np.flatnonzero(np.asarray(project(start, ParamBudget(count=5))["w"]))) != support
    solver = ADMM(
        budget=ParamBudget(count=5),
        optimizer=optax.adam(1e-2),
        rho=GeometricRho(1e-2, 1.2),
        iterations=30,
        epochs_per_iteration=5,
        finetune=Finetune(epochs=20),
        batch_size=10,
    )
    result = solver.run(start, _ls_loss, data, key=jax.random.key(0))
    w = np.asarray(result.params["w"][:, 0])
    assert set(np.flatnonzero(w)) == support
    np.testing.assert_allclose(w, w_star, atol=0.05)
    assert result.nonzero_weights == 5
    admm = result.records("admm")
    assert len(admm) == 30
    assert admm[-1]["primal_relative"] < 0.2 and admm[0]["primal_relative"] > 0.4
    assert all(np.isfinite(r["dual_residual"]) for r in admm)


def test_rho_schedule_and_dual_rescaling():
    data, _ = _sparse_least_squares(seed=1)
    solver = ADMM(
        budget=ParamBudget(count=5),
        optimizer=optax.sgd(1e-2),
        rho=GeometricRho(1e-2, 2.0, 0.05),
        iterations=4,
        finetune=Finetune(epochs=0),
        batch_size=10,
    )
    state = solver.init(_dense_start(data), jax.random.key(0))
    rhos = []
    for _ in range(4):
        before = state
        state, record = solver.update(state, _ls_loss, data)
        rhos.append(record["rho"])
        # U-step by hand, then the rescaling that keeps rho * U unchanged.
        w, z = np.asarray(state.params["w"]), np.asarray(state.z["w"])
        u_step = np.asarray(before.u["w"]) + w - z
        np.testing.assert_allclose(
            float(state.rho) * np.asarray(state.u["w"]),
            float(before.rho) * u_step,
            rtol=1e-5,
            atol=1e-7,
        )
        assert np.count_nonzero(z) == 5
    assert rhos == pytest.approx([0.01, 0.02, 0.04, 0.05])
    assert float(state.rho) == pytest.approx(0.05)


def test_tolerance_stops_early_and_reports_convergence():
    data, _ = _sparse_least_squares(seed=2)
    # Full-batch SGD: a deterministic W-step that can drive the residuals to zero
    # (Adam's steps of about lr keep a residual floor near lr).
    solver = ADMM(
        budget=ParamBudget(count=5),
        optimizer=optax.sgd(0.05),
        rho=GeometricRho(0.1, 1.3, 10.0),
        iterations=50,
        epochs_per_iteration=20,
        finetune=Finetune(epochs=0),
        batch_size=40,
        tol=1e-3,
    )
    result = solver.run(_dense_start(data), _ls_loss, data, key=jax.random.key(0))
    n = len(result.records("admm"))
    assert result.converged is True and n < 50
    last = result.records("admm")[-1]
    assert last["primal_relative"] <= 1e-3 and last["dual_relative"] <= 1e-3
    before = result.records("admm")[-2]
    assert max(before["primal_relative"], before["dual_relative"]) > 1e-3


def test_resume_from_a_checkpointed_state_is_deterministic(checkpoint_at):
    data, _ = _sparse_least_squares(seed=3)
    solver = ADMM(
        budget=ParamBudget(count=5),
        optimizer=optax.adam(1e-2),
        rho=GeometricRho(1e-2, 1.3),
        iterations=6,
        finetune=Finetune(epochs=2),
        batch_size=10,
    )
    keep_third, saved = checkpoint_at(3)
    start = _dense_start(data)
    full = solver.run(start, _ls_loss, data, key=jax.random.key(7), on_iteration=keep_third)
    like = solver.init(start, jax.random.key(0))
    state = load_checkpoint(saved["path"], like)
    assert int(state.iteration) == 3
    resumed = solver.run(
        None, _ls_loss, data, key=jax.random.key(7), state=state, history=saved["history"]
    )
    assert len(resumed.records("admm")) == 6 and resumed.epochs == full.epochs
    np.testing.assert_array_equal(np.asarray(full.params["w"]), np.asarray(resumed.params["w"]))
    again = solver.run(start, _ls_loss, data, key=jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(full.params["w"]), np.asarray(again.params["w"]))


@pytest.mark.parametrize(
    "optimizer",
    [optax.adamw(1e-2, weight_decay=0.1), optax.sgd(1e-2, momentum=0.9, nesterov=True)],
    ids=["adamw", "nesterov"],
)
def test_masked_training_keeps_pruned_weights_exactly_zero(optimizer):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 30)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 256), jnp.int32)
    params = {
        "w": jnp.asarray(rng.standard_normal((30, 3)), jnp.float32),
        "b": jnp.zeros(3, jnp.float32),
    }

    def loss(p, batch):
        xb, yb = batch
        return optax.softmax_cross_entropy_with_integer_labels(xb @ p["w"] + p["b"], yb).mean()

    masks = ParamBudget(keep=0.2).mask(params)
    trained, history = admmprune.train(
        params,
        loss,
        (x, y),
        optimizer=optimizer,
        epochs=3,
        batch_size=32,
        key=jax.random.key(0),
        masks=masks,
    )
    w, m = np.asarray(trained["w"]), np.asarray(masks["w"])
    assert np.all(w[~m] == 0.0) and not np.any(np.signbit(w[~m]))  # exactly +0.0
    assert np.all(w[m] != np.asarray(params["w"])[m])  # the kept weights did train
    assert len(history) == 3


def _small_classifier(seed: int = 0):
    rng = np.random.default_rng(seed)
    from admmprune.data import synthetic_classification

    split = synthetic_classification(512, dim=20, classes=4, seed=seed)
    data = (jnp.asarray(split.x), jnp.asarray(split.y))
    params = {
        "l1": {
            "kernel": jnp.asarray(rng.standard_normal((20, 32)) / 4, jnp.float32),
            "bias": jnp.zeros(32, jnp.float32),
        },
        "l2": {
            "kernel": jnp.asarray(rng.standard_normal((32, 4)) / 6, jnp.float32),
            "bias": jnp.zeros(4, jnp.float32),
        },
    }
    return params, data


def _mlp_loss(p, batch):
    x, y = batch
    h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize(
    "solver",
    [
        MagnitudePrune(
            ParamBudget(keep=0.1), optax.adam(1e-2), finetune=Finetune(epochs=2), batch_size=64
        ),
        IterativeMagnitudePrune(
            ParamBudget(keep=0.1), optax.adam(1e-2), rounds=3, epochs_per_round=1, batch_size=64
        ),
        ADMM(
            ParamBudget(keep=0.1, allocation="uniform"),
            optax.adam(1e-2),
            rho=1e-3,  # the constant penalty these figures were set with
            iterations=2,
            finetune=Finetune(epochs=1),
            batch_size=64,
        ),
    ],
    ids=["magnitude", "iterative", "admm"],
)
def test_every_solver_meets_the_budget_exactly(solver):
    params, data = _small_classifier()
    result = solver.run(params, _mlp_loss, data, key=jax.random.key(0))
    assert result.nonzero_weights == round(0.1 * (20 * 32 + 32 * 4))
    assert result.prunable_weights == 20 * 32 + 32 * 4
    for layer in ("l1", "l2"):
        w = np.asarray(result.params[layer]["kernel"])
        np.testing.assert_array_equal(w != 0, np.asarray(result.masks[layer]["kernel"]))
    assert result.epochs == solver.epochs
    assert result.wall_seconds > 0
    assert "total" in result.summary()


def test_iterative_pruning_masks_are_nested():
    params, data = _small_classifier(1)
    supports = []

    def support(p):
        supports.append(np.asarray(p["l1"]["kernel"]) != 0)
        return {}

    solver = IterativeMagnitudePrune(
        ParamBudget(keep=0.1), optax.adam(1e-2), rounds=4, epochs_per_round=1, batch_size=64
    )
    solver.run(params, _mlp_loss, data, key=jax.random.key(0), eval_fn=support)
    # eval_fn runs after every prune and every retraining epoch: supports only shrink.
    assert len(supports) == 8
    for before, after in itertools.pairwise(supports):
        assert not np.any(after & ~before)
    assert supports[-1].sum() < supports[0].sum()


def test_bad_solver_settings_are_rejected():
    with pytest.raises(ValueError, match="rho must be positive"):
        ADMM(ParamBudget(keep=0.1), optax.sgd(0.1), rho=0.0)
    with pytest.raises(ValueError, match="rho_growth must be >= 1"):
        ADMM(ParamBudget(keep=0.1), optax.sgd(0.1), rho=GeometricRho(1e-3, 0.5))
    params, data = _small_classifier()
    with pytest.raises(ValueError, match="batch_size=1000 exceeds the 512 training examples"):
        ADMM(ParamBudget(keep=0.1), optax.sgd(0.1), batch_size=1000).run(
            params, _mlp_loss, data, key=jax.random.key(0)
        )


def test_checkpoint_rejects_a_mismatched_template(tmp_path):
    save_checkpoint(tmp_path / "c.npz", {"a": np.zeros((2, 3)), "b": np.ones(4)})
    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(tmp_path / "c.npz", {"a": np.zeros((3, 2)), "b": np.ones(4)})
    with pytest.raises(ValueError, match="same model, budget and optimizer"):
        load_checkpoint(tmp_path / "c.npz", {"a": np.zeros((2, 3))})


@pytest.mark.parametrize("metric", ["fisher", "diag_fisher"])
def test_fisher_metric_matches_per_example_gradients(metric):
    kinds = {"fisher": Fisher, "diag_fisher": DiagFisher}
    """d against the oracle: per-example gradients one at a time, squared and averaged."""
    data, _ = _sparse_least_squares(0, n=64, d=12)
    params = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((12, 1)), jnp.float32)}
    solver = ADMM(ParamBudget(count=4), optax.sgd(0.1), metric=kinds[metric](examples=64))
    d = solver.metric_weights(params, _ls_loss, data, jax.random.key(0))["w"]
    x, y = (np.asarray(a, np.float64) for a in data)
    w = np.asarray(params["w"][:, 0], np.float64)
    grads = 0.5 * 2 * (x @ w - y)[:, None] * x  # d/dw of 0.5 (x.w - y)^2, one row per example
    fisher = np.mean(grads**2, axis=0)
    want = np.full(12, fisher.mean()) if metric == "fisher" else fisher + 0.01 * fisher.mean()
    np.testing.assert_allclose(np.broadcast_to(d, (12, 1))[:, 0], want / want.mean(), rtol=1e-4)


def test_diag_fisher_projection_keeps_the_largest_saliency():
    """With a per-weight metric the Z-step keeps the top-k of d_i w_i^2 (OBD), not of |w_i|."""
    w = jnp.asarray([[3.0], [2.0], [1.0], [0.5]])
    d = {"w": jnp.asarray([[0.01], [1.0], [4.5], [64.0]])}  # saliencies 0.09, 4, 4.5, 16
    solver = ADMM(ParamBudget(count=2), optax.sgd(0.1), metric=DiagFisher())
    state = solver.init({"w": w}, jax.random.key(0), d)
    assert np.flatnonzero(np.asarray(state.z["w"][:, 0])).tolist() == [2, 3]
    _, masks = solver.hard_prune(state)
    assert np.asarray(masks["w"][:, 0]).tolist() == [False, False, True, True]


@pytest.mark.parametrize("metric", ["fisher", "diag_fisher"])
def test_a_run_in_a_fisher_metric_resumes_from_its_checkpoint(checkpoint_at, metric):
    """The checkpoint carries the metric d; ``metric_like`` gives load_checkpoint its shape."""
    data, _ = _sparse_least_squares(seed=3)
    solver = ADMM(
        ParamBudget(count=5),
        optax.adam(1e-2),
        rho=1e-2,
        iterations=4,
        finetune=Finetune(epochs=1),
        batch_size=10,
        metric={"fisher": Fisher, "diag_fisher": DiagFisher}[metric](examples=40),
    )
    keep_second, saved = checkpoint_at(2)
    start = _dense_start(data)
    full = solver.run(start, _ls_loss, data, key=jax.random.key(7), on_iteration=keep_second)
    like = solver.init(start, jax.random.key(0), solver.metric_like(start))
    state = load_checkpoint(saved["path"], like)
    np.testing.assert_array_equal(np.asarray(state.metric["w"]), np.asarray(full.state.metric["w"]))
    resumed = solver.run(
        None, _ls_loss, data, key=jax.random.key(7), state=state, history=saved["history"]
    )
    np.testing.assert_array_equal(np.asarray(full.params["w"]), np.asarray(resumed.params["w"]))


def test_progressive_admm_moves_the_budget_from_dense_to_the_target():
    data, _ = _sparse_least_squares(seed=4)
    solver = ADMM(
        ParamBudget(count=5),
        optax.adam(1e-2),
        rho=GeometricRho(1e-2, 1.2),
        iterations=6,
        finetune=Finetune(epochs=0),
        batch_size=10,
        budget_ramp=BudgetRamp(4),
    )
    start = _dense_start(data)
    state = solver.init(start, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(state.z["w"]), np.asarray(start["w"]))  # t = 0
    counts, progress = [], []
    for _ in range(6):
        state, record = solver.update(state, _ls_loss, data)
        counts.append(int(np.count_nonzero(np.asarray(state.z["w"]))))
        progress.append(record["budget_progress"])
    # ParamBudget.relax: kept count geometric from 80 to 5.
    want = [round(80 * (5 / 80) ** t) for t in (0.25, 0.5, 0.75)]
    assert progress == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert counts[:3] == pytest.approx(want, abs=1) and counts[3:] == [5, 5, 5]
    result = solver.run(start, _ls_loss, data, key=jax.random.key(0))
    assert int(np.count_nonzero(np.asarray(result.params["w"]))) == 5
    with pytest.raises(ValueError, match="decay_iterations"):
        ADMM(ParamBudget(count=5), optax.sgd(0.1), budget_ramp=BudgetRamp(-1))


def test_a_decaying_budget_is_not_mistaken_for_convergence():
    """While the Z-step budget decays Z stays near W, so the residuals are small; ``tol``
    must not stop the run (and skip to the hard prune) before the target is reached."""
    data, _ = _sparse_least_squares(seed=5)
    solver = ADMM(
        ParamBudget(count=5), optax.adam(1e-2), rho=1e-2, iterations=8,
        finetune=Finetune(epochs=0), batch_size=10, budget_ramp=BudgetRamp(5),
        tol=10.0,  # any residual passes the test
    )  # fmt: skip
    result = solver.run(_dense_start(data), _ls_loss, data, key=jax.random.key(0))
    records = result.records("admm")
    assert len(records) == 5 and records[-1]["budget_progress"] == 1.0
    assert result.converged is True
    with pytest.raises(ValueError, match="has not reached the target by the last of iterations=8"):
        dataclasses.replace(solver, budget_ramp=BudgetRamp(9))


def test_quick_recipes_scale_the_budget_decay_with_the_iterations():
    from pathlib import Path

    from admmprune.recipes import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "solvers" / "lenet5_energy_12pct.toml")
    decaying = recipe.with_overrides({"solver.decay_iterations": 10}).scaled(0.2)
    assert decaying.solver["iterations"] == 3 and decaying.solver["decay_iterations"] == 2
    assert recipe.scaled(0.2).solver["decay_iterations"] == 0
