"""A data loader of your own: called with no arguments, it returns
``((x_train, y_train), (x_test, y_test))`` -- inputs shaped ``(n, *input_shape)``,
integer class labels shaped ``(n,)`` (recipe: ``data = "data:load"``).

This one hands over MNIST; put your own reading here.
"""

from __future__ import annotations

import numpy as np

from admmprune.data import load_mnist


def load() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    mnist = load_mnist(download=True)
    return (mnist.train.x, mnist.train.y), (mnist.test.x, mnist.test.y)
