"""Channel and branch groups (admmprune.groups): derive() against hand-worked models,
and every derived structure checked by its oracle -- a compact network computes what
the masked network computes, at the MACs the structure counted."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admmprune import apply_masks, models
from admmprune._tree import leaf_names
from admmprune.compact import compact
from admmprune.groups import (
    BranchGroup,
    ChannelGroup,
    Member,
    Structure,
    StructureError,
    derive,
    kept_counts,
)
from admmprune.nnx import record_layers, split_nnx

# ---------------------------------------------------------------------------- helpers


def build(cls, seed=0, **kwargs):
    """``cls`` with random parameters, without running flax's initializers.

    Real initialization compiles every initializer op on the CPU (seconds per
    model); the groups and the oracle only need shapes and some nonzero values.
    Every leaf is Gaussian (biases and BatchNorm statistics too, so a missing
    producer shows), BatchNorm variances positive. The module is in eval mode.
    """
    abstract = nnx.eval_shape(lambda: cls(nnx.Rngs(0), **kwargs))
    graphdef, state, rest = nnx.split(abstract, (nnx.Param, nnx.BatchStat), ...)
    rng = np.random.default_rng(seed)
    pure = nnx.to_pure_dict(state)
    paths = jax.tree_util.tree_flatten_with_path(pure)[0]
    values = []
    for path, leaf in paths:
        if str(path[-1].key) == "var":
            values.append(rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32))
        else:  # kernels at 1/sqrt(fan-in), so outputs stay O(1) in float32
            scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.5
            values.append((scale * rng.standard_normal(leaf.shape)).astype(np.float32))
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(jax.tree.structure(pure), values))
    model = nnx.merge(graphdef, state, rest)
    model.eval()
    return model


def abstract(cls):
    """Shapes only: enough for derive() (no initializer runs)."""
    return nnx.eval_shape(lambda: cls(nnx.Rngs(0)))


def random_keep(structure, rng, p=0.5):
    """A random kept-channel vector per group, at least one channel each."""
    keep = {}
    for g in structure.groups:
        k = rng.random(g.size) < p
        k[rng.integers(g.size)] = True
        keep[g.name] = k
    return keep


# The oracle runs each network once: XLA's backend optimizations cost more compile
# time (seconds for LeNet-5 on a 2-core CPU) than they save.
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def _masks_fn(structure, branches):
    return quick_jit(lambda p, k: structure.masks(p, k, dict(branches) if branches else None))


def masks_of(structure, params, keep, branches=None):
    """``structure.masks`` under one jit (eager, every small op compiles on its own)."""
    return _masks_fn(structure, tuple(sorted((branches or {}).items())))(params, keep)


_APPLY: dict[int, tuple] = {}


def masked_apply(model):
    """The model's jitted inference function, one per model (compiled once)."""
    if id(model) not in _APPLY:
        params, apply = split_nnx(model, train=False)
        _APPLY[id(model)] = (model, params, quick_jit(apply))
    return _APPLY[id(model)][1:]


def masked_and_compact(model, structure, masks, x):
    """(masked network's outputs, compact network's outputs, compact model)."""
    params, apply = masked_apply(model)
    masked = apply(apply_masks(params, masks), x)
    small, small_params = compact(model, params, masks, structure)
    own_params, small_apply = split_nnx(small, train=False)
    # the params compact returns are the compact model's own
    assert jax.tree.map(np.shape, own_params) == jax.tree.map(np.shape, small_params)
    for a, b in zip(jax.tree.leaves(own_params), jax.tree.leaves(small_params), strict=True):
        np.testing.assert_array_equal(a, b)
    out = quick_jit(small_apply)(small_params, x)
    return np.asarray(masked), np.asarray(out), small


def assert_compact_matches(model, structure, masks, input_shape, seed=0):
    """The oracle: compact(...) computes the masked network, at ``macs_of(masks)`` MACs."""
    x = np.random.default_rng(seed).standard_normal((3, *input_shape)).astype(np.float32)
    masked, out, small = masked_and_compact(model, structure, masks, x)
    np.testing.assert_allclose(out, masked, rtol=1e-5, atol=1e-5)
    assert derive(small, input_shape).dense_macs == pytest.approx(structure.macs_of(masks))
    return small


# ---------------------------------------------------------------------------- models


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


class SameCNN(nnx.Module):
    """(6, 6, 2) -> conv3x3 SAME 4 -> BN -> relu -> conv3x3 SAME 3 -> relu -> flatten -> 5."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), padding="SAME", rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 3, (3, 3), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(6 * 6 * 3, 5, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = jax.nn.relu(self.conv2(x))
        return self.fc(x.reshape(x.shape[0], -1))


class ResAdd(nnx.Module):
    """stem conv 4 -> h + conv_b(relu(conv_a(relu(h)))) -> relu -> mean over space -> 3.

    The add joins stem's and conv_b's channels: one group, two producing layers.
    """

    def __init__(self, rngs):
        self.stem = nnx.Conv(2, 4, (3, 3), padding="SAME", rngs=rngs)
        self.conv_a = nnx.Conv(4, 3, (3, 3), padding="SAME", rngs=rngs)
        self.conv_b = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x)
        h = h + self.conv_b(jax.nn.relu(self.conv_a(jax.nn.relu(h))))
        return self.head(jax.nn.relu(h).mean(axis=(1, 2)))


class LayerNormNet(nnx.Module):
    """fc1 -> relu -> fc2 -> LayerNorm -> fc3: fc2's channels are normalized together."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 4, rngs=rngs)
        self.ln = nnx.LayerNorm(4, rngs=rngs)
        self.fc3 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.fc1(x))
        return self.fc3(self.ln(self.fc2(x)))


class SoftmaxNet(nnx.Module):
    """fc1 -> relu -> fc2 -> softmax over the hidden axis -> fc3."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 4, rngs=rngs)
        self.fc3 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.fc1(x))
        return self.fc3(jax.nn.softmax(self.fc2(x), axis=-1))


class NoBiasStrided(nnx.Module):
    """A bias-free stride-2 VALID conv, a max-pool, then two dense layers."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), strides=2, padding="VALID", use_bias=False, rngs=rngs)
        self.fc1 = nnx.Linear(2 * 2 * 4, 6, use_bias=False, rngs=rngs)
        self.fc2 = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(jax.nn.relu(self.conv(x)), (2, 2), (2, 2))  # (9, 9) -> (4, 4) -> (2, 2)
        x = jnp.tanh(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


class Im2colCNN(nnx.Module):
    """LeNet-5's layers at 8x8: models.Conv (VALID, im2col), 2x2 max-pool, flatten, dense."""

    def __init__(self, rngs):
        self.conv1 = models.Conv(1, 3, (3, 3), padding="VALID", rngs=rngs)
        self.conv2 = models.Conv(3, 4, (2, 2), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(2 * 2 * 4, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        x = models.max_pool_2x2(self.conv1(x))  # 8 -> 6 -> 3
        x = self.conv2(x)  # 3 -> 2
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


TINY = [
    (Im2colCNN, (8, 8, 1)),
    (BNMLP, (6,)),
    (SameCNN, (6, 6, 2)),
    (ResAdd, (6, 6, 2)),
    (LayerNormNet, (6,)),
    (SoftmaxNet, (6,)),
    (NoBiasStrided, (9, 9, 1)),
]


@pytest.fixture(scope="module")
def derived():
    """``{class name: (model, structure)}`` for every tiny model (built once)."""
    out = {}
    for cls, shape in TINY:
        model = build(cls)
        out[cls.__name__] = (model, derive(model, shape))
    return out


def producers(g):
    return {(m.leaf, m.axis, m.index) for m in g.producers}


def consumers(g):
    return {(m.leaf, m.axis, m.index) for m in g.consumers}


# ---------------------------------------------------------------------------- LeNets


def test_lenet300_groups_and_macs():
    s = derive(abstract(models.LeNet300), (784,))
    assert [(g.name, g.size) for g in s.groups] == [("fc1/kernel", 300), ("fc2/kernel", 100)]
    fc1, fc2 = s.groups
    assert producers(fc1) == {("fc1/kernel", 1, None), ("fc1/bias", 0, None)}
    assert consumers(fc1) == {("fc2/kernel", 0, None)}
    assert producers(fc2) == {("fc2/kernel", 1, None), ("fc2/bias", 0, None)}
    assert consumers(fc2) == {("fc3/kernel", 0, None)}
    assert {layer.kernel: layer.macs for layer in s.layers} == {
        "fc1/kernel": 784 * 300,
        "fc2/kernel": 300 * 100,
        "fc3/kernel": 100 * 10,
    }
    assert s.dense_macs == 266_200
    assert s.branches == ()


def test_lenet5_groups_flatten_map_and_macs():
    s = derive(abstract(models.LeNet5), (28, 28, 1))
    assert [(g.name, g.size) for g in s.groups] == [
        ("conv1/kernel", 20),
        ("conv2/kernel", 50),
        ("fc1/kernel", 500),
    ]
    conv1, conv2, fc1 = s.groups
    assert producers(conv1) == {("conv1/kernel", 3, None), ("conv1/bias", 0, None)}
    assert consumers(conv1) == {("conv2/kernel", 2, None)}  # HWIO input axis
    assert producers(conv2) == {("conv2/kernel", 3, None), ("conv2/bias", 0, None)}
    # flatten of (4, 4, 50): row i of fc1 reads channel i % 50
    assert consumers(conv2) == {("fc1/kernel", 0, tuple(i % 50 for i in range(800)))}
    assert producers(fc1) == {("fc1/kernel", 1, None), ("fc1/bias", 0, None)}
    assert consumers(fc1) == {("fc2/kernel", 0, None)}
    macs = {layer.kernel: layer.macs for layer in s.layers}
    # conv1: 24*24 outputs x 5*5*1 x 20; conv2: 8*8 x 5*5*20 x 50; fc1: 800 x 500; fc2: 500 x 10
    assert macs == {
        "conv1/kernel": 288_000,
        "conv2/kernel": 1_600_000,
        "fc1/kernel": 400_000,
        "fc2/kernel": 5_000,
    }
    assert s.dense_macs == 2_293_000
    by_kernel = {layer.kernel: layer for layer in s.layers}
    assert by_kernel["conv2/kernel"].in_positions == (25,) * 20  # 5x5 taps per input channel
    assert by_kernel["fc1/kernel"].in_positions == (16,) * 50  # 4x4 positions per channel
    assert by_kernel["fc2/kernel"].outputs is None


# ---------------------------------------------------------------------------- tiny models


def test_im2col_convolutions_like_lenet5(derived):
    _, s = derived["Im2colCNN"]
    assert [(g.name, g.size) for g in s.groups] == [
        ("conv1/kernel", 3),
        ("conv2/kernel", 4),
        ("fc1/kernel", 5),
    ]
    assert producers(s.group("conv1/kernel")) == {
        ("conv1/kernel", 3, None),
        ("conv1/bias", 0, None),
    }
    assert consumers(s.group("conv1/kernel")) == {("conv2/kernel", 2, None)}
    assert consumers(s.group("conv2/kernel")) == {
        ("fc1/kernel", 0, tuple(i % 4 for i in range(16)))
    }
    # conv1: 6*6 x 3*3*1 x 3 = 972; conv2: 2*2 x 2*2*3 x 4; fc1: 16 x 5; fc2: 5 x 2
    assert {layer.kernel: layer.macs for layer in s.layers} == {
        "conv1/kernel": 972,
        "conv2/kernel": 192,
        "fc1/kernel": 80,
        "fc2/kernel": 10,
    }


def test_batchnorm_parameters_and_statistics_are_producers(derived):
    _, s = derived["BNMLP"]
    assert [(g.name, g.size) for g in s.groups] == [("fc1/kernel", 5), ("fc2/kernel", 4)]
    fc1 = s.group("fc1/kernel")
    assert producers(fc1) == {
        ("fc1/kernel", 1, None),
        ("fc1/bias", 0, None),
        ("bn1/scale", 0, None),
        ("bn1/bias", 0, None),
        ("bn1/mean", 0, None),
        ("bn1/var", 0, None),
    }
    assert consumers(fc1) == {("fc2/kernel", 0, None)}
    assert {layer.kernel: layer.macs for layer in s.layers} == {
        "fc1/kernel": 30,
        "fc2/kernel": 20,
        "fc3/kernel": 12,
    }


def test_same_padding_cnn_groups_and_macs(derived):
    _, s = derived["SameCNN"]
    assert [(g.name, g.size) for g in s.groups] == [("conv1/kernel", 4), ("conv2/kernel", 3)]
    conv1, conv2 = s.groups
    assert producers(conv1) == {
        ("conv1/kernel", 3, None),
        ("conv1/bias", 0, None),
        ("bn1/scale", 0, None),
        ("bn1/bias", 0, None),
        ("bn1/mean", 0, None),
        ("bn1/var", 0, None),
    }
    assert consumers(conv1) == {("conv2/kernel", 2, None)}
    assert consumers(conv2) == {("fc/kernel", 0, tuple(i % 3 for i in range(108)))}
    # SAME keeps 6x6 outputs: 36 x 3*3*2 x 4, 36 x 3*3*4 x 3, 108 x 5
    assert {layer.kernel: layer.macs for layer in s.layers} == {
        "conv1/kernel": 2592,
        "conv2/kernel": 3888,
        "fc/kernel": 540,
    }


def test_residual_add_joins_two_layers_into_one_group(derived):
    _, s = derived["ResAdd"]
    assert len(s.groups) == 2
    (joined,) = [g for g in s.groups if "stem/kernel" in g.name]
    assert set(joined.name.split("+")) == {"stem/kernel", "conv_b/kernel"}
    assert joined.size == 4
    assert producers(joined) == {
        ("stem/kernel", 3, None),
        ("stem/bias", 0, None),
        ("conv_b/kernel", 3, None),
        ("conv_b/bias", 0, None),
    }
    assert consumers(joined) == {("conv_a/kernel", 2, None), ("head/kernel", 0, None)}
    conv_a = s.group("conv_a/kernel")
    assert producers(conv_a) == {("conv_a/kernel", 3, None), ("conv_a/bias", 0, None)}
    assert consumers(conv_a) == {("conv_b/kernel", 2, None)}
    by_kernel = {layer.kernel: layer for layer in s.layers}
    assert by_kernel["conv_b/kernel"].inputs == "conv_a/kernel"
    assert by_kernel["conv_b/kernel"].outputs == joined.name
    assert by_kernel["stem/kernel"].outputs == joined.name
    assert by_kernel["head/kernel"].inputs == joined.name


@pytest.mark.parametrize("name", ["LayerNormNet", "SoftmaxNet"])
def test_channels_normalized_together_are_dropped(derived, name):
    # LayerNorm and softmax read every channel of fc2 at once: removing one
    # changes the others, so fc2 must not be a group; fc1 still is.
    _, s = derived[name]
    assert [g.name for g in s.groups] == ["fc1/kernel"]
    assert consumers(s.group("fc1/kernel")) == {("fc2/kernel", 0, None)}
    by_kernel = {layer.kernel: layer for layer in s.layers}
    assert by_kernel["fc2/kernel"].outputs is None
    assert by_kernel["fc3/kernel"].inputs is None
    assert s.dense_macs == 30 + 20 + 12


def test_bias_free_strided_conv_and_pool(derived):
    _, s = derived["NoBiasStrided"]
    assert [(g.name, g.size) for g in s.groups] == [("conv/kernel", 4), ("fc1/kernel", 6)]
    assert producers(s.group("conv/kernel")) == {("conv/kernel", 3, None)}
    assert consumers(s.group("conv/kernel")) == {("fc1/kernel", 0, tuple(i % 4 for i in range(16)))}
    assert producers(s.group("fc1/kernel")) == {("fc1/kernel", 1, None)}
    # stride 2 VALID on 9x9: 4x4 outputs x 3*3*1 x 4
    assert {layer.kernel: layer.macs for layer in s.layers} == {
        "conv/kernel": 16 * 9 * 4,
        "fc1/kernel": 16 * 6,
        "fc2/kernel": 12,
    }


@pytest.mark.parametrize("cls, shape", TINY, ids=[c.__name__ for c, _ in TINY])
def test_output_layer_is_never_a_group(derived, cls, shape):
    model, s = derived[cls.__name__]
    params, _ = split_nnx(model)
    last = s.layers[-1]
    out_width = np.shape(_named(params)[last.kernel])[-1]
    assert last.outputs is None and last.out_width == out_width
    owner = last.kernel.rsplit("/", 1)[0] + "/"
    for g in s.groups:
        assert not any(m.leaf.startswith(owner) for m in g.producers)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cls, shape", TINY, ids=[c.__name__ for c, _ in TINY])
def test_compact_equals_masked_network(derived, cls, shape, seed):
    model, s = derived[cls.__name__]
    params, _ = split_nnx(model, train=False)
    keep = random_keep(s, np.random.default_rng(seed))
    masks = masks_of(s, params, keep)
    small = assert_compact_matches(model, s, masks, shape, seed)
    # every leaf shrank to the kept channels of the groups it belongs to
    _, small_params = compact(model, params, masks, s)
    small_shapes = {n: np.shape(x) for n, x in _named(small_params).items()}
    for g in s.groups:
        for m in g.members:
            n = np.shape(_named(params)[m.leaf])[m.axis]
            assert small_shapes[m.leaf][m.axis] == int(keep[g.name][m.positions(n)].sum())
    assert kept_counts(s, masks) == {k: int(v.sum()) for k, v in keep.items()}
    assert small is not None


def _named(tree):
    from admmprune._tree import named_leaves

    return named_leaves(tree)


def test_compact_of_the_dense_mask_is_the_same_network(derived):
    model, s = derived["SameCNN"]
    params, _ = split_nnx(model, train=False)
    masks = jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)
    x = np.random.default_rng(3).standard_normal((2, 6, 6, 2)).astype(np.float32)
    masked, out, small = masked_and_compact(model, s, masks, x)
    assert jax.tree.map(np.shape, split_nnx(small)[0]) == jax.tree.map(np.shape, params)
    np.testing.assert_allclose(out, masked, rtol=1e-6, atol=1e-6)
    # the original model is untouched by compact
    assert model.conv1.kernel.shape == (3, 3, 2, 4)


def test_derived_macs_match_compact_for_counts(derived):
    # macs(counts) (uniform positions) agrees with macs_of(masks) and the compact network
    model, s = derived["SameCNN"]
    params, _ = split_nnx(model, train=False)
    rng = np.random.default_rng(5)
    for _ in range(5):
        keep = random_keep(s, rng)
        counts = {k: int(v.sum()) for k, v in keep.items()}
        masks = masks_of(s, params, keep)
        c1, c2 = counts["conv1/kernel"], counts["conv2/kernel"]
        hand = 36 * 18 * c1 + 36 * 9 * c1 * c2 + 36 * c2 * 5
        assert s.macs(counts) == pytest.approx(hand)
        assert s.macs_of(masks) == pytest.approx(hand)


class SlicedChannels(nnx.Module):
    """fc2 reads fc1's channels 0, 2, 4 (a strided slice of the channel axis)."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 6, rngs=rngs)
        self.fc2 = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x))[:, ::2])


class TiedLayer(nnx.Module):
    """fc1 applied twice: its kernel's rows and columns are the same channels."""

    def __init__(self, rngs):
        self.fc0 = nnx.Linear(6, 5, rngs=rngs)
        self.fc1 = nnx.Linear(5, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.fc0(x))
        h = jax.nn.relu(self.fc1(jax.nn.relu(self.fc1(h))))
        return self.fc2(h)


def test_a_sliced_channel_axis_is_never_a_wrong_group():
    """A fixed slice of a channel axis makes its group unprunable, never a wrong map."""
    model = build(SlicedChannels)
    s = derive(model, (6,))
    params, _ = split_nnx(model, train=False)
    for g in s.groups:  # whatever derive keeps must survive the oracle
        keep = {g.name: np.array([True, False, True, True, True, True])}
        assert_compact_matches(model, s, masks_of(s, params, keep), (6,))


def test_a_layer_called_twice_gives_consistent_groups():
    """Tied weights (a layer called twice) produce one joined group."""
    model = build(TiedLayer)
    s = derive(model, (6,))
    names = [g.name for g in s.groups]
    assert len(names) == len(set(names)), names
    params, _ = split_nnx(model, train=False)
    keep = random_keep(s, np.random.default_rng(0))
    assert_compact_matches(model, s, masks_of(s, params, keep), (6,))


# ---------------------------------------------------------------------------- wrong structures


def _with_group(s, name, **changes):
    groups = tuple(dataclasses.replace(g, **changes) if g.name == name else g for g in s.groups)
    return dataclasses.replace(s, groups=groups)


def test_oracle_catches_a_missing_consumer(derived):
    model, s = derived["BNMLP"]
    params, _ = split_nnx(model, train=False)
    keep = {"fc1/kernel": np.array([True, False, True, False, True])}
    masks_ok = masks_of(s, params, keep)
    assert_compact_matches(model, s, masks_ok, (6,))  # the derived structure passes
    wrong = _with_group(s, "fc1/kernel", consumers=())  # forgets fc2's rows
    masks = masks_of(wrong, params, keep)
    # compact keeps all of fc2's rows, which no longer match fc1's 3 outputs
    with pytest.raises((AssertionError, StructureError, TypeError, ValueError)):
        assert_compact_matches(model, wrong, masks, (6,))


def test_oracle_catches_a_wrong_flatten_map(derived):
    model, s = derived["SameCNN"]
    params, _ = split_nnx(model, train=False)
    keep = {"conv1/kernel": np.ones(4, bool), "conv2/kernel": np.array([True, False, True])}
    # channel-major instead of channel-minor: same shapes, wrong rows kept
    wrong = _with_group(
        s, "conv2/kernel", consumers=(Member("fc/kernel", 0, tuple(i // 36 for i in range(108))),)
    )
    wrong.check(params)  # a valid structure, only wrong
    masks = masks_of(wrong, params, keep)
    with pytest.raises(AssertionError):
        assert_compact_matches(model, wrong, masks, (6, 6, 2))


def test_oracle_catches_a_missing_producer(derived):
    model, s = derived["BNMLP"]
    params, _ = split_nnx(model, train=False)
    g = s.group("fc1/kernel")
    wrong = _with_group(
        s, g.name, producers=tuple(m for m in g.producers if m.leaf != "bn1/bias")
    )  # the BatchNorm shift keeps a removed channel alive in the masked network
    keep = {"fc1/kernel": np.array([True, False, True, True, False])}
    masks = masks_of(wrong, params, keep)
    with pytest.raises((AssertionError, StructureError, TypeError, ValueError)):
        assert_compact_matches(model, wrong, masks, (6,))


# ---------------------------------------------------------------------------- Structure.check


def _hand_structure():
    params = {
        "a": {"kernel": np.ones((3, 4)), "bias": np.ones(4)},
        "b": {"kernel": np.ones((4, 2))},
    }
    g = ChannelGroup(
        "a/kernel", 4, (Member("a/kernel", 1), Member("a/bias", 0)), (Member("b/kernel", 0),)
    )
    return params, g


def test_check_accepts_a_correct_hand_structure():
    params, g = _hand_structure()
    Structure((g,)).check(params)
    Structure((dataclasses.replace(g, consumers=(Member("b/kernel", -2),)),)).check(params)


@pytest.mark.parametrize(
    "member, words",
    [
        (Member("c/kernel", 0), r"names leaf 'c/kernel'.*leaves are"),
        (Member("b/kernel", 2), r"b/kernel has 2 axes, not axis 2"),
        (Member("b/kernel", -3), r"b/kernel has 2 axes, not axis -3"),
        (Member("b/kernel", 0, (0, 1, 2, 4)), r"do not map onto the group's 4 channels"),
        (Member("b/kernel", 0, (0, 1, 2, -1)), r"do not map onto"),
        (Member("b/kernel", 0, (0, 1, 2)), r"has 4 positions"),  # index of the wrong length
    ],
)
def test_check_rejects_bad_members(member, words):
    params, g = _hand_structure()
    bad = dataclasses.replace(g, consumers=(member,))
    with pytest.raises(StructureError, match=words):
        Structure((bad,)).check(params)


def test_check_rejects_an_identity_member_of_the_wrong_length():
    # regression: Structure.check once accepted an identity member shorter than its group
    params, g = _hand_structure()
    bad = dataclasses.replace(g, consumers=(Member("b/kernel", 1),))  # axis 1 has 2, not 4
    with pytest.raises(StructureError):
        Structure((bad,)).check(params)


def test_check_rejects_a_bad_branch():
    params, g = _hand_structure()
    with pytest.raises(StructureError, match=r"branch 'blk'.*\['nope'\]"):
        Structure((g,), (BranchGroup("blk", ("a/kernel", "nope")),)).check(params)
    with pytest.raises(StructureError, match=r"branch 'blk'"):
        Structure((g,), (BranchGroup("blk", ()),)).check(params)


def test_group_lookup_names_the_groups():
    _, g = _hand_structure()
    with pytest.raises(StructureError, match=r"no channel group 'x'.*a/kernel"):
        Structure((g,)).group("x")


# ---------------------------------------------------------------------------- masks, scores


def test_masks_scores_and_kept_against_numpy():
    rng = np.random.default_rng(0)
    params = {
        "a": {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)},
        "b": {"kernel": rng.standard_normal((8, 2))},  # reads channel i % 4 at row i
        "bn": {"mean": 10.0 + rng.standard_normal(4)},  # a statistic: masked, never scored
    }
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    g = ChannelGroup(
        "a/kernel",
        4,
        (Member("a/kernel", 1), Member("a/bias", 0), Member("bn/mean", 0, statistic=True)),
        (Member("b/kernel", 0, tuple(i % 4 for i in range(8))),),
    )
    s = Structure((g,))
    s.check(params)
    keep = np.array([True, False, False, True])

    @quick_jit
    def figures(p, k):
        return s.scores(p), s.l1_scores(p), s.masks(p, k), s.masks(p, k, consumers=False)

    scores, l1_scores, m, producers_only = figures(params, {"a/kernel": keep})
    energy = (params["a"]["kernel"] ** 2).sum(0) + params["a"]["bias"] ** 2
    np.testing.assert_allclose(scores["a/kernel"], energy, rtol=1e-5)
    l1 = np.abs(params["a"]["kernel"]).sum(0)  # kernels only, not the bias
    np.testing.assert_allclose(l1_scores["a/kernel"], l1, rtol=1e-5)
    np.testing.assert_array_equal(m["bn"]["mean"], keep)
    np.testing.assert_array_equal(m["a"]["kernel"], np.broadcast_to(keep, (3, 4)))
    np.testing.assert_array_equal(m["a"]["bias"], keep)
    np.testing.assert_array_equal(
        m["b"]["kernel"], np.broadcast_to(np.tile(keep, 2)[:, None], (8, 2))
    )
    assert bool(np.all(producers_only["b"]["kernel"]))
    np.testing.assert_array_equal(producers_only["a"]["bias"], keep)
    channels, _ = s.kept(m)
    np.testing.assert_array_equal(channels["a/kernel"], keep)
    assert s.kept(producers_only)[0]["a/kernel"].tolist() == keep.tolist()
    # a channel whose only nonzero producer is a statistic is not alive
    stats_only = jax.tree.map(np.asarray, m)
    stats_only["bn"]["mean"] = np.ones(4, bool)
    np.testing.assert_array_equal(s.kept(stats_only)[0]["a/kernel"], keep)
    assert all(bool(np.all(x)) for x in jax.tree.leaves(masks_of(s, params, {})))


def test_structure_is_hashable():
    s = derive(abstract(models.LeNet300), (784,))
    assert hash(s) == hash(derive(abstract(models.LeNet300), (784,)))


# ---------------------------------------------------------------------------- residual branches


def _residual_model():
    residual = getattr(models, "Residual", None)
    if residual is None:
        pytest.skip("admmprune.models.Residual has not landed yet")

    class Branch(nnx.Module):
        def __init__(self, rngs):
            self.conv_a = nnx.Conv(4, 3, (3, 3), padding="SAME", rngs=rngs)
            self.conv_b = nnx.Conv(3, 4, (3, 3), padding="SAME", rngs=rngs)

        def __call__(self, x):
            return self.conv_b(jax.nn.relu(self.conv_a(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Conv(2, 4, (3, 3), padding="SAME", rngs=rngs)
            self.block1 = residual(Branch(rngs))
            self.block2 = residual(Branch(rngs))
            self.head = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            h = self.block2(self.block1(self.stem(x)))
            return self.head(jax.nn.relu(h).mean(axis=(1, 2)))

    return build(Net)


def test_residual_branches_are_branch_groups():
    model = _residual_model()
    s = derive(model, (6, 6, 2))
    assert [b.name for b in s.branches] == ["block1/branch", "block2/branch"]
    for b in s.branches:
        assert set(b.leaves) == {
            f"{b.name}/conv_a/kernel",
            f"{b.name}/conv_a/bias",
            f"{b.name}/conv_b/kernel",
            f"{b.name}/conv_b/bias",
        }
    (joined,) = [g for g in s.groups if "stem/kernel" in g.name]
    assert {m.leaf for m in joined.producers} >= {
        "stem/kernel",
        "block1/branch/conv_b/kernel",
        "block2/branch/conv_b/kernel",
    }
    assert {m.leaf for m in joined.consumers} == {
        "block1/branch/conv_a/kernel",
        "block2/branch/conv_a/kernel",
        "head/kernel",
    }
    by_kernel = {layer.kernel: layer for layer in s.layers}
    assert by_kernel["block1/branch/conv_a/kernel"].branch == "block1/branch"
    assert by_kernel["stem/kernel"].branch is None


@pytest.mark.parametrize("kept", [(True, False), (False, True), (False, False)])
def test_compact_removes_branches(kept):
    model = _residual_model()
    s = derive(model, (6, 6, 2))
    params, _ = split_nnx(model, train=False)
    flags = {b.name: k for b, k in zip(s.branches, kept, strict=True)}
    keep = random_keep(s, np.random.default_rng(1))
    masks = masks_of(s, params, keep, flags)
    _, alive = s.kept(masks)
    assert alive == flags
    small = assert_compact_matches(model, s, masks, (6, 6, 2))
    for b, k in zip(s.branches, kept, strict=True):
        owner = getattr(small, b.name.split("/")[0])
        assert isinstance(owner.branch, models.Zero) != k


def _mini_rescnn():
    """ResCNN's parts at 6x6: ConvBN stem, Residual(Branch), Downsample, Residual(Branch)."""
    for name in ("Residual", "Branch", "Downsample", "ConvBN"):
        if not hasattr(models, name):
            pytest.skip(f"admmprune.models.{name} has not landed yet")

    class Mini(nnx.Module):
        def __init__(self, rngs):
            self.stem = models.ConvBN(2, 4, rngs=rngs)
            self.block1 = models.Residual(models.Branch(4, 4, rngs=rngs))
            self.down2 = models.Downsample(4, 6, rngs=rngs)
            self.block2 = models.Residual(models.Branch(6, 6, rngs=rngs))
            self.fc = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.relu(self.stem(x))
            x = jax.nn.relu(self.block1(x))
            x = jax.nn.relu(self.down2(x))
            x = jax.nn.relu(self.block2(x))
            return self.fc(x.mean(axis=(1, 2)))

    return build(Mini)


def test_mini_rescnn_compact_equals_masked():
    model = _mini_rescnn()
    s = derive(model, (6, 6, 2))
    names = {frozenset(g.name.split("+")) for g in s.groups}
    # the stem joins block1's output; down2's branch and shortcut join block2's output
    assert frozenset({"stem/conv/kernel", "block1/branch/conv2/kernel"}) in names
    assert (
        frozenset(
            {
                "down2/branch/conv2/kernel",
                "down2/shortcut/conv/kernel",
                "block2/branch/conv2/kernel",
            }
        )
        in names
    )
    for g in s.groups:  # BatchNorm statistics are members, but not scored
        for m in g.producers:
            assert m.statistic == m.leaf.endswith(("/mean", "/var"))
    params, _ = split_nnx(model, train=False)
    keep = random_keep(s, np.random.default_rng(0))
    flags = {"block1/branch": False, "block2/branch": True}
    masks = masks_of(s, params, keep, flags)
    small = assert_compact_matches(model, s, masks, (6, 6, 2))
    assert isinstance(small.block1.branch, models.Zero)


def test_rescnn_groups_and_branches():
    if not hasattr(models, "ResCNN"):
        pytest.skip("admmprune.models.ResCNN has not landed yet")
    model = abstract(models.ResCNN)
    s = derive(model, (28, 28, 1))
    names = leaf_names(split_nnx(model)[0])
    residuals = [
        "/".join(map(str, path))
        for path, m in nnx.iter_modules(model)
        if isinstance(m, models.Residual)
    ]
    assert residuals and [b.name for b in s.branches] == [f"{r}/branch" for r in residuals]
    for b in s.branches:
        assert set(b.leaves) == {n for n in names if n.startswith(b.name + "/")}
    # nothing in ResCNN reads channels jointly: every layer but the last produces a group
    produced = {m.leaf for g in s.groups for m in g.producers}
    kernels = [layer.kernel for layer in s.layers]
    assert set(kernels[:-1]) <= produced and kernels[-1] not in produced
    for g in s.groups:  # a joined group's producers all sit on one residual stream
        assert len({m.leaf for m in g.producers if m.leaf.endswith("kernel")}) == len(
            g.name.split("+")
        )


LAYER_MODELS = [(cls, shape) for cls, shape in TINY] + [
    (models.LeNet300, (784,)),
    (models.LeNet5, (28, 28, 1)),
]
if hasattr(models, "ResCNN"):
    LAYER_MODELS.append((models.ResCNN, (28, 28, 1)))


@pytest.mark.parametrize("cls, shape", LAYER_MODELS, ids=[c.__name__ for c, _ in LAYER_MODELS])
def test_layer_macs_match_the_layers_as_called(cls, shape):
    # an independent count: hook every Linear/Conv call, MACs = output size x kernel fan-in
    model = build(cls)
    macs = {}

    def hook(name, layer, x, y):
        macs[name] = int(np.prod(y.shape[1:])) * int(np.prod(layer.kernel.shape[:-1]))

    with record_layers(model, hook):
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    s = derive(model, shape)
    assert {layer.kernel: layer.macs for layer in s.layers} == macs
    assert s.dense_macs == sum(macs.values())
