"""LeNets and the residual CNN: shapes and weight counts, the im2col convolution, the nnx
adapter, the accuracy helper."""

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


# ---------------------------------------------------------------------------- the residual CNN

RESCNN_WEIGHTS = 102_120  # conv and dense kernels (ResCNN's docstring)
RESCNN_VECTORS = 842  # BatchNorm scales and shifts, dense biases
RESCNN_MACS = 2_600_736


@pytest.mark.parametrize(
    ("padding", "strides", "kernel", "size", "bias"),
    [
        ("SAME", 1, (3, 3), 7, True),
        ("SAME", 2, (3, 3), 7, False),  # odd size: pads (1, 1)
        ("SAME", 2, (3, 3), 8, True),  # even size: pads (0, 1)
        ("SAME", 2, (1, 1), 7, False),  # the projection shortcut
        ("SAME", (2, 1), (2, 3), 8, True),
        ("VALID", 2, (3, 3), 8, False),
        ("VALID", 1, (2, 3), 7, True),
    ],
)
def test_conv_fast_path_matches_flax_conv_general_dilated(padding, strides, kernel, size, bias):
    """im2col (+ zero padding, strided slicing) against nnx.Conv's lax convolution."""
    from admmprune.models import Conv

    kw = {"strides": strides, "padding": padding, "use_bias": bias}
    ours = Conv(3, 5, kernel, rngs=nnx.Rngs(1), **kw)
    theirs = nnx.Conv(3, 5, kernel, rngs=nnx.Rngs(1), **kw)
    if bias:  # a nonzero bias, so adding it is checked
        ours.bias[...] = theirs.bias[...] = jnp.arange(5.0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size, 3)), jnp.float32)
    got, want = ours(x), theirs(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(ours)(x))  # the fast path ran


def test_conv_falls_back_to_flax_for_dilation():
    from admmprune.models import Conv

    ours = Conv(2, 3, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(0))
    theirs = nnx.Conv(2, 3, (3, 3), kernel_dilation=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 9, 2)), jnp.float32)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert "conv_general_dilated" in str(jax.make_jaxpr(ours)(x))


def test_conv_impl_xla_traces_xla_convolution_with_the_same_result():
    from admmprune.models import Conv, conv_impl

    conv = Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 9, 9, 3)), jnp.float32)

    def trace():  # a new function each time: a trace is cached per function
        return str(jax.make_jaxpr(lambda x: conv(x))(x))

    assert "conv_general_dilated" not in trace()
    with conv_impl("xla"):
        assert "conv_general_dilated" in trace()
        xla = conv(x)
    assert "conv_general_dilated" not in trace()  # reset on exit
    np.testing.assert_allclose(xla, conv(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="im2col"), conv_impl("cudnn"):  # type: ignore[arg-type]
        pass


def test_residual_adds_its_branch_and_zero_removes_it():
    from admmprune.models import Residual, Zero

    lin = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    block = Residual(lin)
    assert block.branch is lin
    np.testing.assert_allclose(block(x), x + x @ lin.kernel[...] + lin.bias[...], rtol=1e-6)
    np.testing.assert_array_equal(Zero()(x), jnp.zeros_like(x))
    block.branch = Zero()
    np.testing.assert_array_equal(block(x), x)
    params, _ = split_nnx(block)
    assert params == {}  # a removed branch holds no parameters


@pytest.fixture(scope="module")
def rescnn():
    """One ResCNN for the tests below (each takes an ``nnx.clone``); building it is slow-ish."""
    from admmprune.models import ResCNN

    return ResCNN(nnx.Rngs(0))


def _batch(n=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((n, 28, 28, 1)), jnp.float32)


def test_rescnn_architecture_counts_and_names(rescnn):
    from admmprune.models import INPUT_SHAPES, MODELS, Downsample, ResCNN, Residual
    from admmprune.nnx import record_layers

    assert MODELS["rescnn"] is ResCNN and INPUT_SHAPES["rescnn"] == (28, 28, 1)
    model = nnx.clone(rescnn)
    params, apply = split_nnx(model)
    x = _batch()
    assert apply(params, x).shape == (2, 10)
    assert apply(params, x.reshape(2, 784)).shape == (2, 10)
    identity = [p for p, m in nnx.iter_modules(model) if isinstance(m, Residual)]
    assert identity == [("block1",), ("block2",), ("block3",)]
    assert isinstance(model.down1, Downsample) and isinstance(model.down2, Downsample)
    names = admmprune.leaf_names(params)
    for name in (
        "stem/conv/kernel",
        "stem/bn/scale",
        "down1/branch/conv1/kernel",
        "down1/shortcut/conv/kernel",
        "block1/branch/conv1/kernel",
        "block1/branch/bn2/bias",
        "block3/branch/conv2/kernel",
        "fc/kernel",
    ):
        assert name in names
    assert not any(n.endswith(("conv/bias", "conv1/bias", "conv2/bias")) for n in names)
    # the docstring's counts: trainable weights, and MACs = out_h * out_w * kh * kw * cin * cout
    _, weights, _ = nnx.split(model, nnx.Param, ...)
    leaves = jax.tree.leaves(nnx.to_pure_dict(weights))
    kernels = [w for w in leaves if w.ndim > 1]
    assert sum(w.size for w in kernels) == RESCNN_WEIGHTS
    assert sum(w.size for w in leaves) - sum(w.size for w in kernels) == RESCNN_VECTORS
    macs = {}

    def hook(name, layer, x, y):
        spatial = int(np.prod(y.shape[1:-1])) if y.ndim == 4 else 1
        macs[name] = spatial * layer.kernel[...].size

    with record_layers(model, hook):
        model(x)
    assert macs["stem/conv/kernel"] == 28 * 28 * 3 * 3 * 1 * 8
    assert macs["block3/branch/conv2/kernel"] == 4 * 4 * 3 * 3 * 48 * 48
    assert sum(macs.values()) == RESCNN_MACS


def test_rescnn_batchnorm_uses_batch_statistics_in_train_mode_and_running_ones_in_eval(rescnn):
    model = nnx.clone(rescnn)
    x = _batch(4)
    # train mode (as constructed): each channel normalized by the batch's mean and variance
    h = model.stem(x)
    np.testing.assert_allclose(h.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(h.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    y = model(x)
    assert not np.allclose(model(x[:2])[0], y[0], atol=1e-4)  # depends on the rest of the batch
    model.eval()
    # eval mode: the running statistics, whatever the batch
    bn = model.stem.bn
    expected = (model.stem.conv(x) - bn.mean[...]) / np.sqrt(bn.var[...] + bn.epsilon)
    np.testing.assert_allclose(model.stem(x), expected * bn.scale[...] + bn.bias[...], atol=1e-5)
    y = model(x)
    np.testing.assert_allclose(model(x[:2]), y[:2], rtol=1e-4, atol=1e-5)
    params, apply = split_nnx(model)
    np.testing.assert_allclose(apply(params, x), y, rtol=1e-5, atol=1e-6)


def test_rescnn_trains_through_im2col_convolutions_only(rescnn):
    """The training gradient has no lax convolution (10-60x slower in the epoch's scan)."""
    params, apply = split_nnx(nnx.clone(rescnn))
    batch = (_batch(), jnp.zeros((2,), jnp.int32))
    grads = str(jax.make_jaxpr(jax.grad(cross_entropy_loss(apply)))(params, batch))
    assert "conv_general_dilated" not in grads
    assert "dot_general" in grads
