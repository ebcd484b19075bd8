"""Energy models: what a pruned network costs to run, layer by layer.

Two models map a network and its nonzero pattern to energy, per layer and in
total, and each reports its dense energy and its floor (every prunable weight
zero):

* :class:`AcceleratorEnergy`: the analytic systolic-array model of Yang, Zhu
  & Liu (ICLR 2019), built from the layer shapes of an nnx model
  (:func:`admmprune.layers.layer_shapes`);
* :class:`LinearEnergy`: a user's table of cost per nonzero weight per layer
  plus a constant.

Both are layer-wise: with inputs held fixed each layer's energy is
piecewise affine in its nonzero weight count n,

    E_l(n) = floor_l + c1_l * min(n, kink_l) + c2_l * max(0, n - kink_l)

(``kink_l`` the kernel cache for convolutions, infinite for dense layers), so
:class:`admmprune.energy_budget.EnergyBudget` projects onto
``{W : E(W) <= B}`` by a knapsack (:mod:`admmprune.knapsack`). ECC's bilinear
model over channel counts is :mod:`admmprune.bilinear`.

References:
    H. Yang, Y. Zhu, J. Liu, "Energy-Constrained Compression for Deep Neural
    Networks via Weighted Sparse Projection and Layer Input Masking", ICLR 2019.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from admmprune._tree import PyTree, leaf_names
from admmprune.layers import LayerShape, layer_shapes


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


def nonzero_counts(params: PyTree) -> dict[str, int]:
    """Nonzero entries of every leaf of ``params`` (a boolean mask counts its True)."""
    return {
        n: int(np.count_nonzero(np.asarray(leaf)))
        for n, leaf in zip(leaf_names(params), jax.tree.leaves(params), strict=True)
    }


class LayerwiseEnergy:
    """An energy model that is a sum of per-layer piecewise-affine terms.

    Subclasses give :meth:`costs` (one :class:`LayerCost` per prunable leaf)
    and may set ``constant`` (energy that no pruning removes). Then

        E(W) = constant + sum_l E_l(||W_l||_0),

    which is what the knapsack projection of :class:`EnergyBudget` needs.
    """

    constant: float = 0.0

    def costs(self) -> tuple[LayerCost, ...]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-ready parameters of the model, for reports."""
        raise NotImplementedError

    def per_layer_counts(self, counts: Mapping[str, float]) -> dict[str, float]:
        """Energy of every modelled layer given its nonzero weight count."""
        out = {}
        for c in self.costs():
            if c.name not in counts:
                raise KeyError(f"{c.name} is not a leaf of params; leaves are {sorted(counts)}.")
            out[c.name] = c.energy(counts[c.name])
        return out

    def per_layer(self, params: PyTree) -> dict[str, float]:
        """Energy of every modelled layer at the nonzero pattern of ``params``."""
        return self.per_layer_counts(nonzero_counts(params))

    def energy(self, params: PyTree) -> float:
        """Total energy at the nonzero pattern of ``params`` (a mask works too)."""
        return self.constant + sum(self.per_layer(params).values())

    def dense(self) -> float:
        """Energy with every weight nonzero."""
        return self.constant + sum(c.energy(c.size) for c in self.costs())

    def floor(self) -> float:
        """Energy with every prunable weight zero: no budget below it is feasible."""
        return self.constant + sum(c.floor for c in self.costs())

    def breakdown(self, params: PyTree) -> dict[str, Any]:
        """The ``energy`` block of a report: dense, pruned, fraction, per layer."""
        per = self.per_layer(params)
        costs = {c.name: c for c in self.costs()}
        dense = self.dense()
        pruned = self.constant + sum(per.values())
        return {
            "model": self.describe(),
            "dense": dense,
            "pruned": pruned,
            "fraction": pruned / dense,
            "floor": self.floor(),
            "floor_fraction": self.floor() / dense,
            "constant": self.constant,
            "per_layer": {
                name: {
                    "dense": costs[name].energy(costs[name].size),
                    "pruned": e,
                    "floor": costs[name].floor,
                    "share_of_pruned": e / pruned,
                }
                for name, e in per.items()
            },
        }


@dataclasses.dataclass(frozen=True)
class AcceleratorEnergy(LayerwiseEnergy):
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

    def describe(self) -> dict[str, Any]:
        units = ("e_mac", "e_mem", "e_cache", "e_rf", "input_cache", "kernel_cache")
        out: dict[str, Any] = {"type": "accelerator", **{k: getattr(self, k) for k in units}}
        out["array"] = [self.array_rows, self.array_cols]
        return out


@dataclasses.dataclass(frozen=True)
class LinearEnergy(LayerwiseEnergy):
    """A user's cost table: ``E = constant + sum_l (floor_l + cost_l ||W_l||_0)``.

    For users who measured (or were given) a cost per nonzero weight of each
    layer. Build it against a parameter pytree with :meth:`from_params`.

    Attributes:
        layers: one :class:`LayerCost` per costed leaf (``c1 == c2``, no kink).
        constant: energy no pruning removes.
    """

    layers: tuple[LayerCost, ...]
    constant: float = 0.0

    def __post_init__(self) -> None:
        for c in self.layers:
            if not (c.c1 > 0 and math.isfinite(c.c1)) or c.floor < 0:
                raise ValueError(
                    f"{c.name}: the cost per weight must be positive and finite and the "
                    f"floor >= 0, got cost {c.c1}, floor {c.floor}."
                )
        if self.constant < 0:
            raise ValueError(f"constant must be >= 0, got {self.constant}.")

    @classmethod
    def from_params(
        cls,
        params: PyTree,
        per_weight: Mapping[str, float],
        *,
        constant: float = 0.0,
        floors: Mapping[str, float] | None = None,
    ) -> LinearEnergy:
        """The table ``{leaf name: cost per nonzero weight}`` against ``params``.

        Example:
            >>> LinearEnergy.from_params(params, {"fc1/kernel": 210.0, "fc2/kernel": 210.0})
        """
        sizes = {
            n: int(np.size(leaf))
            for n, leaf in zip(leaf_names(params), jax.tree.leaves(params), strict=True)
        }
        floors = dict(floors or {})
        unknown = sorted((set(per_weight) | set(floors)) - set(sizes))
        if unknown:
            raise ValueError(f"{unknown} are not leaves of params; leaves are {sorted(sizes)}.")
        missing = sorted(set(floors) - set(per_weight))
        if missing:
            raise ValueError(f"floors given for {missing}, which have no cost per weight.")
        layers = tuple(
            LayerCost(n, float(floors.get(n, 0.0)), float(c), float(c), math.inf, sizes[n])
            for n, c in per_weight.items()
        )
        return cls(layers, float(constant))

    def costs(self) -> tuple[LayerCost, ...]:
        return self.layers

    def describe(self) -> dict[str, Any]:
        return {
            "type": "linear",
            "per_weight": {c.name: c.c1 for c in self.layers},
            "floors": {c.name: c.floor for c in self.layers},
            "constant": self.constant,
        }


__all__ = [
    "AcceleratorEnergy",
    "LayerCost",
    "LayerShape",
    "LayerwiseEnergy",
    "LinearEnergy",
    "layer_shapes",
    "nonzero_counts",
]
