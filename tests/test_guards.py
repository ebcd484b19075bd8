"""Inputs checked at the API boundary; divergence stops a run instead of ending as a success."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from admmprune import (
    ADMM,
    Finetune,
    MagnitudePrune,
    OneShotPrune,
    ParamBudget,
    ProjectedSGD,
    project,
    train,
)
from admmprune.guards import (
    DivergenceError,
    InputError,
    LossWatch,
    check_data,
    check_masks,
    check_params,
    check_result,
)
from admmprune.models import LeNet300, cross_entropy_loss, init_model
from admmprune.results import finish


def _ls_problem(seed: int = 0, n: int = 64, d: int = 20):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x @ rng.standard_normal(d)).astype(np.float32)
    return (jnp.asarray(x), jnp.asarray(y)), {"w": jnp.asarray(rng.standard_normal((d, 1)) * 0.1)}


def _ls_loss(params, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ params["w"][:, 0] - y) ** 2)


def test_non_finite_and_integer_params_name_the_leaf():
    good = {"a": {"kernel": jnp.ones((2, 2))}, "b": jnp.zeros(3)}
    check_params(good)
    with pytest.raises(InputError, match=r"leaf 'a/kernel' holds 1 non-finite value"):
        check_params({"a": {"kernel": jnp.array([[1.0, jnp.nan], [0.0, 1.0]])}, "b": good["b"]})
    with pytest.raises(InputError, match=r"leaf 'b' holds 2 non-finite"):
        check_params({"b": jnp.array([jnp.inf, -jnp.inf, 0.0])})
    with pytest.raises(InputError, match=r"leaf 'n' has dtype int32: .* jnp.float32"):
        check_params({"n": jnp.arange(3)})
    with pytest.raises(InputError, match=r"leaf 'x/0' is a float, not an array"):
        check_params({"x": [1.0, 2.0]})
    with pytest.raises(InputError, match="no leaves"):
        check_params({})


def test_non_finite_data_names_the_array():
    x = jnp.ones((4, 3)).at[2, 1].set(jnp.nan)
    with pytest.raises(InputError, match=r"data\[0\] holds 1 non-finite"):
        check_data((x, jnp.arange(4)))
    check_data((jnp.ones((4, 3)), jnp.arange(4)))  # integer labels are fine


def test_masks_unlike_the_params_are_refused():
    params = {"a": jnp.ones((2, 3)), "b": jnp.ones(4)}
    check_masks(jax.tree.map(lambda w: w != 0, params), params)
    with pytest.raises(InputError, match=r"structure \(missing \['b'\]"):
        check_masks({"a": jnp.ones((2, 3), bool)}, params)
    with pytest.raises(InputError, match=r"mask 'a' has shape \(3, 2\)"):
        check_masks({"a": jnp.ones((3, 2), bool), "b": jnp.ones(4, bool)}, params)
    with pytest.raises(InputError, match=r"mask 'b' has dtype float32; masks are boolean"):
        check_masks({"a": jnp.ones((2, 3), bool), "b": jnp.ones(4)}, params)


def test_a_float_budget_says_what_to_write():
    with pytest.raises(InputError, match=r"ADMM\(budget=0.1\).*ParamBudget\(keep=0.1\)"):
        ADMM(budget=0.1, optimizer=optax.adam(1e-3))
    with pytest.raises(InputError, match=r"project\(budget='half'\)"):
        project({"w": jnp.ones((2, 2))}, "half")


def test_project_refuses_nan_weights():
    with pytest.raises(InputError, match="non-finite"):
        project({"w": jnp.array([[1.0, jnp.nan, 3.0]])}, ParamBudget(count=1))


@pytest.mark.parametrize("solver", ["admm", "magnitude", "psgd"])
def test_solvers_reject_non_finite_inputs_before_any_work(solver):
    data, params = _ls_problem()
    budget = ParamBudget(count=5)
    opt = optax.adam(1e-2)
    make = {
        "admm": lambda: ADMM(budget, opt, iterations=1, finetune=Finetune(epochs=1)),
        "magnitude": lambda: MagnitudePrune(budget, opt, finetune=Finetune(epochs=1)),
        "psgd": lambda: ProjectedSGD(budget, opt, projected_epochs=1),
    }[solver]()
    bad_params = {"w": params["w"].at[0, 0].set(jnp.inf)}
    with pytest.raises(InputError, match="'w' holds 1 non-finite"):
        make.run(bad_params, _ls_loss, data, key=jax.random.key(0))
    bad_data = (data[0].at[0, 0].set(jnp.nan), data[1])
    with pytest.raises(InputError, match=r"data\[0\] holds 1 non-finite"):
        make.run(params, _ls_loss, bad_data, key=jax.random.key(0))


def test_oneshot_rejects_inf_weights_and_nan_data():
    params, apply = init_model("lenet300", seed=0)
    x = jax.random.normal(jax.random.key(0), (64, 28, 28, 1))
    y = jnp.arange(64) % 10
    model = LeNet300(__import__("flax").nnx.Rngs(0))
    pruner = OneShotPrune(ParamBudget(keep=0.1), model=model, method="magnitude")
    bad = jax.tree.map(lambda a: a, params)
    bad["fc1"]["kernel"] = bad["fc1"]["kernel"].at[0, 0].set(jnp.inf)
    loss = cross_entropy_loss(apply)
    with pytest.raises(InputError, match="'fc1/kernel' holds 1 non-finite"):
        pruner.run(bad, loss, (x, y), key=jax.random.key(0))
    with pytest.raises(InputError, match=r"data\[0\] holds 1 non-finite"):
        pruner.run(params, loss, (x.at[3, 0, 0, 0].set(jnp.nan), y), key=jax.random.key(0))


def test_a_learning_rate_that_diverges_stops_admm():
    data, params = _ls_problem()
    solver = ADMM(ParamBudget(count=5), optax.sgd(50.0), iterations=4, batch_size=16)
    with pytest.raises(DivergenceError, match="ADMM diverged"):
        solver.run(params, _ls_loss, data, key=jax.random.key(0))


def test_dense_training_that_diverges_stops():
    data, params = _ls_problem()
    with pytest.raises(DivergenceError, match=r"dense diverged|training loss became"):
        train(
            params,
            _ls_loss,
            data,
            optimizer=optax.sgd(50.0),
            epochs=5,
            batch_size=16,
            key=jax.random.key(0),
            phase="dense",
        )


def test_a_loss_far_above_the_start_stops_even_while_finite():
    """The factor alone stops a run, with the phase, the step and the setting named."""
    watch = LossWatch("retrain", reference=0.5, factor=100.0)
    assert watch(49.0, "epoch 1") == 49.0
    with pytest.raises(DivergenceError, match=r"retrain diverged: .* 51 at epoch 2 .* 100x"):
        watch(51.0, "epoch 2")
    with pytest.raises(DivergenceError, match="became nan"):
        LossWatch("dense", 1.0, None)(float("nan"), "epoch 3")
    assert LossWatch("dense", 1.0, 0)(1e30, "epoch 1") == 1e30  # off


def test_a_healthy_run_is_not_stopped():
    data, params = _ls_problem()
    solver = ADMM(ParamBudget(count=5), optax.adam(1e-2), iterations=3, batch_size=16)
    res = solver.run(params, _ls_loss, data, key=jax.random.key(0))
    assert np.isfinite(np.asarray(res.params["w"])).all()


def test_divergence_factor_is_validated():
    with pytest.raises(InputError, match="divergence_factor must be above 1"):
        ADMM(ParamBudget(count=5), optax.adam(1e-2), divergence_factor=0.5)
    with pytest.raises(InputError, match="divergence_factor must be above 1"):
        Finetune(epochs=1, divergence_factor=-3)
    Finetune(epochs=1, divergence_factor=None)


def test_a_non_finite_result_is_a_failure_not_a_result():
    params = {"w": jnp.array([1.0, jnp.nan])}
    with pytest.raises(DivergenceError, match=r"'w' holds 1 non-finite .* nothing was written"):
        check_result(params, "test")
    with pytest.raises(DivergenceError):
        finish(
            params=params,
            masks={"w": jnp.ones(2, bool)},
            budget=ParamBudget(count=1),
            history=[],
            method="test",
            start=0.0,
            epochs=0,
        )


def test_a_model_whose_layers_are_not_the_params_is_named():
    from flax import nnx

    from admmprune.guards import check_model_params
    from admmprune.models import LeNet5

    model = LeNet300(nnx.Rngs(0))
    params, _ = init_model("lenet300")
    check_model_params(model, params, "OneShotPrune")
    other, _ = init_model("lenet5")
    with pytest.raises(InputError, match=r"OneShotPrune: the params are not the model's"):
        check_model_params(model, other, "OneShotPrune")
    wide = jax.tree.map(lambda a: a, params)
    wide["fc3"]["bias"] = jnp.zeros(11)
    with pytest.raises(InputError, match=r"'fc3/bias' has shape \(11,\), the model's \(10,\)"):
        check_model_params(model, wide, "x")
    x = jnp.zeros((8, 28, 28, 1))
    pruner = OneShotPrune(ParamBudget(keep=0.1), model=LeNet5(nnx.Rngs(0)), method="magnitude")
    with pytest.raises(InputError, match="not the model's"):
        pruner.run(
            params,
            cross_entropy_loss(init_model("lenet300")[1]),
            (x, jnp.zeros(8, int)),
            key=jax.random.key(0),
        )


def test_layer_shapes_with_the_wrong_input_shape_says_so():
    from flax import nnx

    from admmprune import layer_shapes

    with pytest.raises(ValueError, match=r"cannot take one input of shape \(27, 28, 1\)"):
        layer_shapes(LeNet300(nnx.Rngs(0)), (27, 28, 1))
