"""A model of your own: any flax nnx module that maps a batch of inputs to logits.

admmprune builds it as ``SmallCNN(nnx.Rngs(seed))`` (recipe: ``model = "nets:SmallCNN"``)
and derives everything else -- prunable kernels, channel groups, layer shapes --
from the module itself.
"""

from __future__ import annotations

import jax
from flax import nnx


class SmallCNN(nnx.Module):
    """Two 3x3 convolutions and a dense head, for 28x28 grey images and 10 classes."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(1, 16, (3, 3), strides=(2, 2), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.fc = nnx.Linear(7 * 7 * 32, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.fc(x.reshape(x.shape[0], -1))
