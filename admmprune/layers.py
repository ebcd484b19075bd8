"""Layer tracing: the dense and convolution layers of an nnx model, as one call sees them.

:func:`layer_shapes` runs a model abstractly on one input and records every
``nnx.Linear``/``nnx.Conv`` call's shapes (in call order), which the energy
models price (:mod:`admmprune.energy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One prunable layer as the energy model sees it.

    Attributes:
        name: the kernel leaf's name (``"conv2/kernel"``).
        kind: ``"dense"`` or ``"conv"``.
        in_features, out_features: d_in and d (channels for convolutions).
        kernel: (kh, kw) for convolutions.
        groups: feature groups g.
        in_hw, out_hw: input and output spatial sizes (convolutions).
        input_nonzero: measured nonzeros of one input (None: dense).
    """

    name: str
    kind: Literal["dense", "conv"]
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    input_nonzero: float | None = None

    @property
    def weights(self) -> int:
        kh, kw = self.kernel
        return kh * kw * (self.in_features // self.groups) * self.out_features

    @property
    def input_size(self) -> int:
        return self.in_hw[0] * self.in_hw[1] * self.in_features

    @property
    def input_nnz(self) -> float:
        return float(self.input_size if self.input_nonzero is None else self.input_nonzero)


def input_shape_error(input_shape: tuple[int, ...], error: Exception) -> ValueError:
    """The error for a model traced on inputs it cannot take (jax's own is about dot_general)."""
    first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return ValueError(
        f"the model cannot take one input of shape {tuple(input_shape)} ({first}); give the "
        "shape of one example as the data feeds it (a recipe's problem.input_shape)."
    )


def layer_shapes(
    model: Any,
    input_shape: tuple[int, ...],
    input_density: Mapping[str, float] | None = None,
) -> tuple[LayerShape, ...]:
    """Reads the dense and convolution layers of an nnx model by tracing one call.

    Every ``nnx.Linear`` and ``nnx.Conv`` (subclasses included) records its
    input and output shapes while ``model`` runs abstractly on one input of
    ``input_shape`` (without the batch axis). Layers are returned in call order.

    Args:
        model: an ``nnx.Module``.
        input_shape: one example's shape, without the batch axis.
        input_density: measured nonzero fraction of each layer's input, keyed
            by kernel name (``{"fc1/kernel": 0.4}``); layers not named are
            taken as dense inputs (the model's conservative default).
    """
    from flax import nnx

    from admmprune.nnx import record_layers

    model = nnx.clone(model)
    model.eval()  # inference mode: a training-mode BatchNorm would update its statistics
    seen: list[LayerShape] = []

    def hook(name: str, layer: Any, x: Any, y: Any) -> None:
        if isinstance(layer, nnx.Conv):
            seen.append(
                LayerShape(
                    name,
                    "conv",
                    int(layer.in_features),
                    int(layer.out_features),
                    kernel=tuple(int(k) for k in layer.kernel_size),
                    groups=int(layer.feature_group_count),
                    in_hw=(int(x.shape[1]), int(x.shape[2])),
                    out_hw=(int(y.shape[1]), int(y.shape[2])),
                )
            )
        else:
            seen.append(LayerShape(name, "dense", int(layer.in_features), int(layer.out_features)))

    with record_layers(model, hook):
        try:
            jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, *input_shape), np.float32))
        except (TypeError, ValueError) as e:
            raise input_shape_error(input_shape, e) from None
    density = dict(input_density or {})
    unknown = sorted(set(density) - {s.name for s in seen})
    if unknown:
        raise ValueError(
            f"input_density names {unknown}, which are not layers of the model; "
            f"layers are {[s.name for s in seen]}."
        )
    out = []
    for layer in seen:
        if layer.name in density:
            d = float(density[layer.name])
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"input_density[{layer.name!r}] must be in [0, 1], got {d}.")
            layer = dataclasses.replace(layer, input_nonzero=d * layer.input_size)
        out.append(layer)
    return tuple(out)


__all__ = ["LayerShape", "layer_shapes"]
