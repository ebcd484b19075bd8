"""Energy models: what a pruned network costs to run, per layer and in total.

First piece of issue 5: the analytic accelerator model of Yang, Zhu & Liu
(ICLR 2019) and reading layer shapes off a flax nnx model. With inputs held
fixed, each layer's energy is piecewise affine in its nonzero weight count n:

    E_l(n) = floor_l + c1_l * min(n, kink_l) + c2_l * max(0, n - kink_l)

(``kink_l`` is the kernel cache for convolutions, infinite for dense layers),
which is what a knapsack projection needs.

References:
    H. Yang, Y. Zhu, J. Liu, "Energy-Constrained Compression for Deep Neural
    Networks via Weighted Sparse Projection and Layer Input Masking", ICLR 2019.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import numpy as np

from admmprune._tree import PyTree, leaf_names


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


def layer_shapes(model: Any, input_shape: tuple[int, ...]) -> tuple[LayerShape, ...]:
    """Reads the dense and convolution layers of an nnx model by tracing one call.

    Every ``nnx.Linear`` and ``nnx.Conv`` (subclasses included) records its
    input and output shapes while ``model`` runs abstractly on one input of
    ``input_shape`` (without the batch axis). Layers are returned in call order.
    """
    from flax import nnx

    paths = {id(m): "/".join(map(str, p)) for p, m in nnx.iter_modules(model)}
    classes = {type(m) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear | nnx.Conv)}
    seen: list[LayerShape] = []
    originals = {cls: cls.__dict__.get("__call__") for cls in classes}

    def recorder(cls: type) -> Any:
        inner = cls.__call__

        def call(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            y = inner(self, x, *args, **kwargs)
            name = f"{paths[id(self)]}/kernel"
            if isinstance(self, nnx.Conv):
                seen.append(
                    LayerShape(
                        name,
                        "conv",
                        int(self.in_features),
                        int(self.out_features),
                        kernel=tuple(int(k) for k in self.kernel_size),
                        groups=int(self.feature_group_count),
                        in_hw=(int(x.shape[1]), int(x.shape[2])),
                        out_hw=(int(y.shape[1]), int(y.shape[2])),
                    )
                )
            else:
                seen.append(
                    LayerShape(name, "dense", int(self.in_features), int(self.out_features))
                )
            return y

        return call

    wrapped = {cls: recorder(cls) for cls in classes}
    try:
        for cls, fn in wrapped.items():
            cls.__call__ = fn
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, *input_shape), np.float32))
    finally:
        for cls, fn in originals.items():
            if fn is None:
                del cls.__call__
            else:
                cls.__call__ = fn
    return tuple(seen)


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """``E(n) = floor + c1 min(n, kink) + c2 max(0, n - kink)`` for one layer."""

    name: str
    floor: float
    c1: float
    c2: float
    kink: float
    size: int

    def energy(self, nonzero: float) -> float:
        return (
            self.floor + self.c1 * min(nonzero, self.kink) + self.c2 * max(0.0, nonzero - self.kink)
        )


@dataclasses.dataclass(frozen=True)
class AcceleratorEnergy:
    """Yang, Zhu & Liu (ICLR 2019): a systolic array after Eyeriss.

    Unit costs are relative to a MAC: ``e_mac`` (MAC with register-file read
    and write), ``e_mem`` (DRAM), ``e_cache`` (global buffer), ``e_rf``
    (register file); ``input_cache`` s1 and ``kernel_cache`` s2 entries;
    a ``array_rows`` x ``array_cols`` PE array. Dense layer, d outputs::

        E = (e_mac + e_mem + e_cache + e_rf) ||W||_0
          + ||x||_0 (ceil(d/cols) e_cache + d e_rf)
          + e_mem (min(||x||_0, s1) + ceil(d/cols) max(0, ||x||_0 - s1)) + e_mem d

    Convolution, output h'w', d filters, g groups::

        E = e_mac h'w' ||W||_0 + b1 min(s2, ||W||_0) + b2 max(0, ||W||_0 - s2)
          + nnz(unfold x) (ceil(d/g/cols) e_cache + ceil(d/g) e_rf)
          + e_mem (min(||x||_0, s1) + ceil(d/g/cols) max(0, ||x||_0 - s1)) + e_mem h'w'd

    with b1 = e_mem + ceil(h'w'/rows) e_cache + h'w' e_rf and
    b2 = ceil(h'w'/rows)(e_mem + e_cache) + h'w' e_rf. The input-overflow
    re-read term of the convolution mirrors the dense one (each column group
    re-reads what does not fit in s1); nnz(unfold x) counts the im2col
    entries, h'w' kh kw (d_in/g) scaled by the input density.
    """

    layers: tuple[LayerShape, ...]
    e_mac: float = 3.0
    e_mem: float = 200.0
    e_cache: float = 6.0
    e_rf: float = 1.0
    input_cache: int = 51_200
    kernel_cache: int = 4_096
    array_rows: int = 12
    array_cols: int = 14

    def cost(self, layer: LayerShape) -> LayerCost:
        """The layer's floor and per-nonzero-weight costs."""
        x = layer.input_nnz
        s1, cols = self.input_cache, self.array_cols
        if layer.kind == "dense":
            d = layer.out_features
            reread = self.e_mem * (min(x, s1) + math.ceil(d / cols) * max(0.0, x - s1))
            floor = x * (math.ceil(d / cols) * self.e_cache + d * self.e_rf) + reread
            floor += self.e_mem * d
            c = self.e_mac + self.e_mem + self.e_cache + self.e_rf
            return LayerCost(layer.name, floor, c, c, math.inf, layer.weights)
        hw = layer.out_hw[0] * layer.out_hw[1]
        d, g = layer.out_features, layer.groups
        kh, kw = layer.kernel
        density = x / layer.input_size
        unfolded = hw * kh * kw * (layer.in_features // g) * density
        tiles = math.ceil(hw / self.array_rows)
        b1 = self.e_mem + tiles * self.e_cache + hw * self.e_rf
        b2 = tiles * (self.e_mem + self.e_cache) + hw * self.e_rf
        per_group = math.ceil(d / g / cols)
        reread = self.e_mem * (min(x, s1) + per_group * max(0.0, x - s1))
        floor = unfolded * (per_group * self.e_cache + math.ceil(d / g) * self.e_rf) + reread
        floor += self.e_mem * hw * d
        compute = self.e_mac * hw
        return LayerCost(
            layer.name,
            floor,
            compute + b1,
            compute + b2,
            float(self.kernel_cache),
            layer.weights,
        )

    def costs(self) -> tuple[LayerCost, ...]:
        return tuple(self.cost(layer) for layer in self.layers)

    def per_layer(self, params: PyTree) -> dict[str, float]:
        """Energy of every modelled layer at the nonzero pattern of ``params``."""
        nnz = {
            n: int(np.count_nonzero(np.asarray(leaf)))
            for n, leaf in zip(leaf_names(params), jax.tree.leaves(params), strict=True)
        }
        out = {}
        for c in self.costs():
            if c.name not in nnz:
                raise KeyError(f"{c.name} is not a leaf of params; leaves are {sorted(nnz)}.")
            out[c.name] = c.energy(nnz[c.name])
        return out

    def energy(self, params: PyTree) -> float:
        """Total energy at the nonzero pattern of ``params``."""
        return sum(self.per_layer(params).values())

    def dense(self) -> float:
        """Energy with every weight nonzero."""
        return sum(c.energy(c.size) for c in self.costs())

    def floor(self) -> float:
        """Energy with every prunable weight zero: no budget below it is feasible."""
        return sum(c.floor for c in self.costs())
