"""Flax (nnx) LeNets and a small residual CNN, their loss and accuracy, for examples and
benchmarks."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from admmprune._tree import PyTree
from admmprune.nnx import Apply, merge_nnx, split_nnx


class LeNet300(nnx.Module):
    """LeNet-300-100: 784-300-ReLU-100-ReLU-10 (266,200 weights, 410 biases).

    Accepts ``(B, 784)`` or ``(B, 28, 28, 1)`` inputs.

    References:
        Y. LeCun et al., "Gradient-based learning applied to document
        recognition", Proc. IEEE 1998; the pruning benchmark of Han et al. 2015.
    """

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(784, 300, rngs=rngs)
        self.fc2 = nnx.Linear(300, 100, rngs=rngs)
        self.fc3 = nnx.Linear(100, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        x = jax.nn.relu(self.fc2(x))
        return self.fc3(x)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    strides: tuple[int, int] = (1, 1),
    padding: str = "VALID",
) -> jax.Array:
    """2-D convolution (NHWC input, HWIO kernel) as zero-padding, im2col and one matmul.

    ``padding`` is ``"VALID"`` or ``"SAME"`` (XLA's split of the padding,
    the smaller half first, as ``lax.conv_general_dilated``); the patches are
    ``kh * kw`` shifted (strided) slices of the padded input concatenated on
    the channel axis, in the (i, j, c) order of ``kernel.reshape(-1, cout)``.
    Same result as ``nnx.Conv`` with those settings. The reason for it is
    speed: XLA on the CPU runs the convolutions of a training step (the
    gradient ones above all) inside a ``lax.scan`` body 10-60x slower than
    this matmul form (measured on a busy 2-core CPU, one layer's training
    step in a scan, batch 128: 3x3 SAME 14x14x16->16 132 ms with the lax
    convolution, 11 ms with this; 14x14x32->32 765 vs 27 ms; 3x3 stride 2
    SAME 28x28x16->32 357 vs 9 ms; 1x1 stride 2 28x28x16->32 91 vs 3 ms; a
    LeNet-5 step 308 vs 18 ms). The lax forward alone is fast in a scan, but
    a lax forward with an im2col gradient gains nothing over this.
    """
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)
    if any(p for pair in pads for p in pair):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    h, w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    patches = [
        x[:, i : i + (h - 1) * sh + 1 : sh, j : j + (w - 1) * sw + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    cols = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    y = cols @ kernel.reshape(kh * kw * cin, cout)
    return y if bias is None else y + bias


def conv2d_valid(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Stride-1 VALID convolution (NHWC input, HWIO kernel) as im2col + one matmul.

    :func:`conv2d` with its defaults; same result as ``nnx.Conv(padding="VALID")``.
    """
    return conv2d(x, kernel, bias)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 on NHWC (even height and width), by reshape."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 average pool with stride 2 on NHWC (even height and width), by reshape."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _ones(v: Any) -> bool:
    return v is None or all(int(e) == 1 for e in (v if isinstance(v, tuple | list) else (v,)))


_CONV_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("conv_impl", default="im2col")


@contextlib.contextmanager
def conv_impl(kind: Literal["im2col", "xla"]) -> Iterator[None]:
    """Trace :class:`Conv` layers as im2col + matmul (the default) or XLA's own convolution.

    The choice is made when a function is traced, and JAX caches a trace per
    function: jit a new function (a fresh ``functools.partial`` or lambda)
    inside ``with conv_impl("xla"):`` to get XLA's convolution. Training wants
    im2col (see :func:`conv2d`); inference on a CPU is often faster with
    XLA's, so latency is measured both ways (:func:`admmprune.compact.compare_latency`).
    """
    if kind not in ("im2col", "xla"):
        raise ValueError(f'conv_impl takes "im2col" or "xla", got {kind!r}.')
    token = _CONV_IMPL.set(kind)
    try:
        yield
    finally:
        _CONV_IMPL.reset(token)


class Conv(nnx.Conv):
    """``nnx.Conv`` whose common 2-D cases run as :func:`conv2d` (im2col + matmul).

    The fast path: NHWC input with one batch axis, ``"VALID"`` or ``"SAME"``
    padding, any strides, no dilation, no feature groups, no mask, default
    dtype and precision; with or without bias. Same parameters, same layout
    (HWIO), same results; other settings, and tracing inside
    ``conv_impl("xla")``, run ``nnx.Conv``.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        fast = (
            _CONV_IMPL.get() == "im2col"
            and x.ndim == 4
            and len(self.kernel_size) == 2
            and self.padding in ("VALID", "SAME")
            and self.feature_group_count == 1
            and self.mask is None
            and self.dtype is None
            and self.precision is None
            and all(_ones(v) for v in (self.kernel_dilation, self.input_dilation))
        )
        if not fast:
            return super().__call__(x)
        strides = (1, 1) if self.strides is None else self.strides
        strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        bias = None if self.bias is None else self.bias[...]
        return conv2d(x, self.kernel[...], bias, strides=strides, padding=self.padding)


class LeNet5(nnx.Module):
    """LeNet-5 in Caffe's form (20-50-500-10; 430,500 weights).

    conv 5x5x20 (VALID) -> max-pool 2x2 -> conv 5x5x50 (VALID) -> max-pool 2x2
    -> flatten (4x4x50 = 800) -> fc 500 -> ReLU -> fc 10. No activation after
    the convolutions, as in Caffe's ``lenet_train_test.prototxt``, the model
    of Han et al. 2015 and Zhang et al. 2018. Kernels use flax layouts (HWIO
    for convolutions); inputs are ``(B, 28, 28, 1)`` NHWC.
    """

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = Conv(1, 20, (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = Conv(20, 50, (5, 5), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(800, 500, rngs=rngs)
        self.fc2 = nnx.Linear(500, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], 28, 28, 1)
        x = max_pool_2x2(self.conv1(x))
        x = max_pool_2x2(self.conv2(x))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        return self.fc2(x)


class Residual(nnx.Module):
    """An identity-shortcut residual block: ``x + branch(x)``.

    ``branch`` must preserve the shape of its input. Depth pruning removes a
    whole residual branch by replacing it with :class:`Zero`, which leaves
    the identity.
    """

    def __init__(self, branch: nnx.Module) -> None:
        self.branch = branch

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.branch(x)


class Zero(nnx.Module):
    """A removed branch: ``zeros_like(x)`` (no parameters)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.zeros_like(x)


class ConvBN(nnx.Module):
    """A convolution without bias followed by BatchNorm (``conv``, ``bn``); no activation."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: tuple[int, int] = (3, 3),
        *,
        strides: int = 1,
        rngs: nnx.Rngs,
    ) -> None:
        self.conv = Conv(
            cin, cout, kernel_size, strides=strides, padding="SAME", use_bias=False, rngs=rngs
        )
        self.bn = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class Branch(nnx.Module):
    """The basic residual branch: conv3x3 -> BN -> ReLU -> conv3x3 -> BN.

    ``conv1`` carries the stride and the channel change; ``conv2`` is
    stride 1, ``cout -> cout``. Convolutions are SAME-padded and bias-free
    (the BatchNorm shift is the bias).
    """

    def __init__(self, cin: int, cout: int, *, strides: int = 1, rngs: nnx.Rngs) -> None:
        kw = {"padding": "SAME", "use_bias": False, "rngs": rngs}
        self.conv1 = Conv(cin, cout, (3, 3), strides=strides, **kw)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = Conv(cout, cout, (3, 3), **kw)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(x))


class Downsample(nnx.Module):
    """A projection-shortcut block: ``branch(x) + shortcut(x)``, stride 2.

    ``branch`` is a stride-2 :class:`Branch` (``cin -> cout``), ``shortcut``
    a stride-2 1x1 :class:`ConvBN`. Not a :class:`Residual`: its branch
    cannot be removed without changing the shape.
    """

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs) -> None:
        self.branch = Branch(cin, cout, strides=2, rngs=rngs)
        self.shortcut = ConvBN(cin, cout, (1, 1), strides=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.branch(x) + self.shortcut(x)


class ResCNN(nnx.Module):
    """A small residual CNN with BatchNorm for 28x28x1 images (Fashion-MNIST), 10 classes.

    With the default ``widths=(8, 24, 48)`` (``w1, w2, w3``)::

        stem    conv3x3 1->8, BN, ReLU at 28x28; 2x2 average pool -> 14x14x8
        down1   Downsample 8->24 (stride 2) -> 7x7x24, ReLU
        block1  Residual(Branch 24) at 7x7, ReLU
        block2  Residual(Branch 24) at 7x7, ReLU
        down2   Downsample 24->48 (stride 2) -> 4x4x48, ReLU
        block3  Residual(Branch 48) at 4x4, ReLU
        fc      mean over height and width -> Linear 48->10

    A :class:`Branch` is conv3x3 -> BN -> ReLU -> conv3x3 -> BN; a
    :class:`Downsample` adds a stride-2 branch and a 1x1 stride-2 conv + BN
    shortcut. Convolutions are SAME-padded and bias-free; every one is
    followed by a BatchNorm. The three identity blocks (``block1..3``, each
    ``x + branch(x)``) are what depth pruning can remove.

    Parameters: 102,120 kernel weights (13 conv kernels, HWIO, and the 48x10
    dense one) plus 842 vectors (416 BatchNorm scales and as many shifts, 10
    dense biases) = 102,962 trainable; BatchNorm's running means and
    variances add 832 statistics. MACs per example (sum over layers of
    ``out_h * out_w * kh * kw * cin * cout``): 2,600,736 -- stem 56,448;
    down1 348,096 (3x3 s2 84,672, 3x3 254,016, 1x1 9,408); block1 and block2
    508,032 each; down2 516,096 (165,888 + 331,776 + 18,432); block3 663,552;
    fc 480.

    Sized for the CPU: one dense training epoch over 60,000 images at batch
    128 takes 1.2-1.4x a LeNet-5 epoch (measured side by side), about 10 s
    on the 2-core CPU where LeNet-5 takes about 8 s. It spends little at
    28x28 and 14x14, where the narrow im2col matmuls are memory-bound: a
    16-channel residual block at 14x14 would alone add about 60% to a step.
    It reaches about 91% test accuracy on Fashion-MNIST in 12 epochs without
    augmentation (AdamW 2e-3, weight decay 5e-4, cosine decay: 91.4%; Adam
    1e-3, cosine: 90.6%; eval mode after BatchNorm recalibration).

    BatchNorm: the module is constructed in training mode (batch statistics;
    ``nnx.BatchNorm``'s default momentum and epsilon); ``model.eval()``
    switches to the running statistics.

    References:
        K. He et al., "Deep residual learning for image recognition", CVPR
        2016 (basic blocks, projection shortcuts); S. Ioffe and C. Szegedy,
        "Batch normalization", ICML 2015.
    """

    def __init__(self, rngs: nnx.Rngs, widths: tuple[int, int, int] = (8, 24, 48)) -> None:
        w1, w2, w3 = widths
        self.stem = ConvBN(1, w1, rngs=rngs)
        self.down1 = Downsample(w1, w2, rngs=rngs)
        self.block1 = Residual(Branch(w2, w2, rngs=rngs))
        self.block2 = Residual(Branch(w2, w2, rngs=rngs))
        self.down2 = Downsample(w2, w3, rngs=rngs)
        self.block3 = Residual(Branch(w3, w3, rngs=rngs))
        self.fc = nnx.Linear(w3, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], 28, 28, 1)
        x = avg_pool_2x2(jax.nn.relu(self.stem(x)))
        x = jax.nn.relu(self.down1(x))
        x = jax.nn.relu(self.block1(x))
        x = jax.nn.relu(self.block2(x))
        x = jax.nn.relu(self.down2(x))
        x = jax.nn.relu(self.block3(x))
        return self.fc(x.mean(axis=(1, 2)))


__all__ = [
    "INPUT_SHAPES",
    "MODELS",
    "Branch",
    "Conv",
    "ConvBN",
    "Downsample",
    "LeNet5",
    "LeNet300",
    "ModelError",
    "ResCNN",
    "Residual",
    "Zero",
    "accuracy",
    "avg_pool_2x2",
    "build_model",
    "conv2d",
    "conv2d_valid",
    "conv_impl",
    "cross_entropy_loss",
    "import_object",
    "init_model",
    "max_pool_2x2",
    "merge_nnx",
    "model_source_digest",
    "split_nnx",
]

MODELS: dict[str, type[nnx.Module]] = {"lenet300": LeNet300, "lenet5": LeNet5, "rescnn": ResCNN}
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "lenet300": (784,),
    "lenet5": (28, 28, 1),
    "rescnn": (28, 28, 1),
}


class ModelError(ValueError):
    """A model name or import path that does not give an nnx model."""


def import_object(path: str, what: str) -> Any:
    """``"package.module:Name"`` -> the object; :class:`ModelError` naming ``what`` if not."""
    import importlib

    module, _, name = path.partition(":")
    if not module or not name:
        raise ModelError(f"{what}: {path!r} is not an import path like 'mypkg.nets:ResNet8'.")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelError(
            f"{what}: cannot import {path!r} ({e}); is the package installed or on PYTHONPATH?"
        ) from None
    if not callable(obj):
        raise ModelError(f"{what}: {path!r} is not a class or function.")
    return obj


def build_model(name: str, seed: int = 0) -> nnx.Module:
    """A model by name: a key of :data:`MODELS`, or a user's by import path.

    ``"mypkg.nets:ResNet8"`` is imported and called as ``ResNet8(nnx.Rngs(seed))``
    (a class or a function of the Rngs alone); it must return an ``nnx.Module``
    built from layers admmprune knows (``nnx.Linear``, ``nnx.Conv``,
    ``nnx.BatchNorm``, ...) that maps a batch of inputs to class logits.

    Raises:
        ModelError: unknown name, failed import, or not an nnx model.
    """
    if ":" not in name:
        if name not in MODELS:
            raise ModelError(
                f"unknown model {name!r}; choose one of {sorted(MODELS)} or give an import "
                "path such as 'mypkg.nets:ResNet8'."
            )
        return MODELS[name](nnx.Rngs(seed))
    factory = import_object(name, "problem.model")
    try:
        model = factory(nnx.Rngs(seed))
    except TypeError as e:
        raise ModelError(
            f"problem.model: {name}(nnx.Rngs(seed)) failed ({e}); the model must be built "
            "from an nnx.Rngs alone (wrap other arguments in a function)."
        ) from None
    if not isinstance(model, nnx.Module):
        raise ModelError(
            f"problem.model: {name} returned a {type(model).__name__}, not an nnx.Module."
        )
    return model


def model_source_digest(name: str, what: str = "problem.model") -> str:
    """A hash of a user model's source file ("" for the built-in models): it keys the
    dense cache and checkpoints, so an edited model never reuses another's network."""
    if ":" not in name:
        return ""
    import hashlib
    import inspect

    try:
        source = inspect.getsourcefile(import_object(name, what))
    except TypeError:
        return ""
    if source is None:
        return ""
    with open(source, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def init_model(name: str, seed: int = 0) -> tuple[dict[str, Any], Apply]:
    """Builds a model by name or import path (:func:`build_model`) and splits it."""
    return split_nnx(build_model(name, seed))


def _xent(apply: Apply, params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    logits = apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def cross_entropy_loss(apply: Apply) -> Callable[[PyTree, Any], jax.Array]:
    """``loss_fn(params, (x, y))``: mean softmax cross-entropy of ``apply``."""
    return functools.partial(_xent, apply)


@functools.partial(jax.jit, static_argnames=("apply", "batch_size"))
def _correct(apply: Apply, params: PyTree, x: jax.Array, y: jax.Array, batch_size: int):
    n = (x.shape[0] // batch_size) * batch_size
    xb = x[:n].reshape(-1, batch_size, *x.shape[1:])
    yb = y[:n].reshape(-1, batch_size)

    def body(total: jax.Array, b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return total + jnp.sum(jnp.argmax(apply(params, b[0]), -1) == b[1]), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), (xb, yb))
    if n < x.shape[0]:
        total = total + jnp.sum(jnp.argmax(apply(params, x[n:]), -1) == y[n:])
    return total


def accuracy(
    apply: Apply, params: PyTree, x: jax.Array, y: jax.Array, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``apply(params, x)`` against integer labels ``y``."""
    batch_size = min(batch_size, x.shape[0])
    return float(_correct(apply, params, x, y, batch_size)) / x.shape[0]
