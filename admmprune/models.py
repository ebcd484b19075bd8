"""Flax (nnx) LeNets, their loss and accuracy, for examples and benchmarks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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


def conv2d_valid(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Stride-1 VALID convolution (NHWC input, HWIO kernel) as im2col + one matmul.

    The patches are ``kh * kw`` shifted slices concatenated on the channel
    axis, in the (i, j, c) order of ``kernel.reshape(-1, cout)``. Same result
    as ``nnx.Conv(padding="VALID")``; the reason for it is speed: XLA on the
    CPU runs ``conv_general_dilated`` inside a ``lax.scan`` body about 10x
    slower than outside it, while a matmul keeps its speed (measured: a LeNet-5
    training step in a scan 308 ms with lax convolutions, 18 ms with this).
    """
    kh, kw, cin, cout = kernel.shape
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = jnp.concatenate(
        [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return cols @ kernel.reshape(kh * kw * cin, cout) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 on NHWC (even height and width), by reshape."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _ones(v: Any) -> bool:
    return v is None or all(int(e) == 1 for e in (v if isinstance(v, tuple | list) else (v,)))


class Conv(nnx.Conv):
    """``nnx.Conv`` whose stride-1, VALID, ungrouped case runs as :func:`conv2d_valid`.

    Same parameters, same layout (HWIO), same results; other settings fall
    back to ``nnx.Conv``.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        simple = (
            self.padding == "VALID"
            and self.feature_group_count == 1
            and self.bias is not None
            and all(_ones(v) for v in (self.strides, self.kernel_dilation, self.input_dilation))
        )
        if not simple:
            return super().__call__(x)
        return conv2d_valid(x, self.kernel[...], self.bias[...])


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


__all__ = [
    "INPUT_SHAPES",
    "MODELS",
    "Conv",
    "LeNet5",
    "LeNet300",
    "accuracy",
    "conv2d_valid",
    "cross_entropy_loss",
    "init_model",
    "max_pool_2x2",
    "merge_nnx",
    "split_nnx",
]

MODELS: dict[str, type[nnx.Module]] = {"lenet300": LeNet300, "lenet5": LeNet5}
INPUT_SHAPES: dict[str, tuple[int, ...]] = {"lenet300": (784,), "lenet5": (28, 28, 1)}


def init_model(name: str, seed: int = 0) -> tuple[dict[str, Any], Apply]:
    """Builds a named model (``"lenet300"`` or ``"lenet5"``) and splits it."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    return split_nnx(MODELS[name](nnx.Rngs(seed)))


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
