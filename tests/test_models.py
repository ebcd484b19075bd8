"""LeNets: shapes and weight counts, the nnx adapter, the accuracy helper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import admmprune
from admmprune.data import synthetic_classification
from admmprune.models import (
    LeNet5,
    LeNet300,
    accuracy,
    conv2d_valid,
    cross_entropy_loss,
    init_model,
    max_pool_2x2,
    merge_nnx,
    split_nnx,
)


def _prunable_count(params):
    flags = admmprune.ParamBudget(keep=1.0).prunable(params)
    return sum(leaf.size for leaf, f in zip(jax.tree.leaves(params), flags, strict=True) if f)


def test_lenet300_shapes():
    params, apply = init_model("lenet300")
    assert _prunable_count(params) == 266_200
    assert params["fc1"]["kernel"].shape == (784, 300)
    assert apply(params, jnp.zeros((3, 28, 28, 1))).shape == (3, 10)
    assert apply(params, jnp.zeros((3, 784))).shape == (3, 10)


def test_lenet5_is_caffe_lenet():
    params, apply = init_model("lenet5")
    assert _prunable_count(params) == 430_500
    assert params["conv1"]["kernel"].shape == (5, 5, 1, 20)  # HWIO
    assert params["conv2"]["kernel"].shape == (5, 5, 20, 50)
    assert params["fc1"]["kernel"].shape == (800, 500)
    assert params["fc2"]["kernel"].shape == (500, 10)
    assert apply(params, jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
    assert admmprune.leaf_names(params) == [
        "conv1/bias",
        "conv1/kernel",
        "conv2/bias",
        "conv2/kernel",
        "fc1/bias",
        "fc1/kernel",
        "fc2/bias",
        "fc2/kernel",
    ]


def test_im2col_convolution_and_pool_match_flax():
    model = LeNet5(nnx.Rngs(2))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 28, 28, 1)), jnp.float32)
    ours = conv2d_valid(x, model.conv1.kernel[...], model.conv1.bias[...])
    np.testing.assert_allclose(ours, model.conv1(x), rtol=1e-5, atol=1e-5)
    h = max_pool_2x2(ours)
    np.testing.assert_array_equal(h, nnx.max_pool(ours, (2, 2), strides=(2, 2)))
    h2 = conv2d_valid(h, model.conv2.kernel[...], model.conv2.bias[...])
    np.testing.assert_allclose(h2, model.conv2(h), rtol=1e-4, atol=1e-4)


def test_no_activation_after_convolutions():
    """Caffe's LeNet: conv -> pool with no ReLU, so negative pooled maps pass through."""
    model = LeNet5(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 28, 28, 1)), jnp.float32)
    h = nnx.max_pool(model.conv1(x), (2, 2), strides=(2, 2))
    assert float(h.min()) < 0  # it would be >= 0 with a ReLU
    h = nnx.max_pool(model.conv2(h), (2, 2), strides=(2, 2)).reshape(1, -1)
    expected = model.fc2(jax.nn.relu(model.fc1(h)))  # Caffe's graph, from flax's own layers
    np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)
    params, apply = split_nnx(model)
    np.testing.assert_allclose(apply(params, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [LeNet300, LeNet5])
def test_split_and_merge_round_trip_under_jit(cls):
    model = cls(nnx.Rngs(1))
    params, apply = split_nnx(model)
    x = jnp.ones((2, 28, 28, 1))
    np.testing.assert_allclose(jax.jit(apply)(params, x), model(x), rtol=1e-5, atol=1e-5)
    zeroed = jax.tree.map(jnp.zeros_like, params)
    merged = merge_nnx(model, zeroed)
    np.testing.assert_array_equal(merged(x), jnp.zeros((2, 10)))


def test_accuracy_matches_numpy_with_a_ragged_last_batch():
    params, apply = init_model("lenet300", seed=3)
    split = synthetic_classification(250, image=True, classes=10, seed=1)
    x, y = jnp.asarray(split.x), jnp.asarray(split.y)
    expected = float(np.mean(np.argmax(np.asarray(apply(params, x)), -1) == split.y))
    assert accuracy(apply, params, x, y, batch_size=64) == pytest.approx(expected)


def test_admm_prunes_a_lenet_end_to_end_on_a_tiny_set():
    params, apply = init_model("lenet300")
    split = synthetic_classification(256, image=True, classes=10, seed=0)
    data = (jnp.asarray(split.x), jnp.asarray(split.y))
    solver = admmprune.ADMM(
        admmprune.ParamBudget(keep=0.02),
        optax.adam(1e-3),
        iterations=2,
        finetune=admmprune.Finetune(epochs=1),
        batch_size=64,
    )
    result = solver.run(params, cross_entropy_loss(apply), data, key=jax.random.key(0))
    assert result.nonzero_weights == round(0.02 * 266_200)
    assert [s.name for s in result.layers] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    for layer in ("fc1", "fc2", "fc3"):  # biases are not prunable by default
        assert np.asarray(result.masks[layer]["bias"]).all()


def test_import_is_light():
    """``import admmprune`` must not pull in cvxpy (or flax): they load where used."""
    import subprocess
    import sys

    code = "import sys, admmprune; print(sorted(m for m in ('cvxpy', 'flax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": "VALID"},
        {"padding": "SAME"},
        {"padding": "VALID", "strides": 2},
        {"padding": "VALID", "feature_group_count": 2},
    ],
)
def test_conv_module_matches_flax_in_every_setting(kwargs):
    from admmprune.models import Conv

    ours = Conv(4, 6, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    theirs = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 4)), jnp.float32)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
