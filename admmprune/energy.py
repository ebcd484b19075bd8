"""Energy models and the energy budget: what a pruned network costs to run.

Three models map a network and its nonzero pattern to energy, per layer and
in total, and each reports its dense energy and its floor (every prunable
weight zero):

* :class:`AcceleratorEnergy`: the analytic systolic-array model of Yang, Zhu
  & Liu (ICLR 2019), built from the layer shapes of an nnx model
  (:func:`layer_shapes`);
* :class:`LinearEnergy`: a user's table of cost per nonzero weight per layer
  plus a constant;
* :class:`BilinearEnergy`: ECC's ``E = b0 + sum_j a_j s_{j-1} s_j`` over kept
  channel fractions (Yang et al., CVPR 2019), fitted to measurements.

The first two are layer-wise: with inputs held fixed each layer's energy is
piecewise affine in its nonzero weight count n,

    E_l(n) = floor_l + c1_l * min(n, kink_l) + c2_l * max(0, n - kink_l)

(``kink_l`` the kernel cache for convolutions, infinite for dense layers),
so :class:`EnergyBudget` projects onto ``{W : E(W) <= B}`` by a knapsack
(:mod:`admmprune.knapsack`).

References:
    H. Yang, Y. Zhu, J. Liu, "Energy-Constrained Compression for Deep Neural
    Networks via Weighted Sparse Projection and Layer Input Masking", ICLR 2019.
    H. Yang et al., "ECC: Platform-Independent Energy-Constrained Deep Neural
    Network Compression via a Bilinear Regression Model", CVPR 2019.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, leaf_names
from admmprune.knapsack import KnapsackStats, exact_knapsack, greedy_core


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
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, *input_shape), np.float32))
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


# ---------------------------------------------------------------------------
# ECC's bilinear model (Yang et al., CVPR 2019)


def kept_channels(params: PyTree, names: Sequence[str]) -> np.ndarray:
    """Fraction of output channels (last kernel axis) with any nonzero weight, per layer."""
    leaves = dict(zip(leaf_names(params), jax.tree.leaves(params), strict=True))
    out = []
    for n in names:
        if n not in leaves:
            raise KeyError(f"{n} is not a leaf of params; leaves are {sorted(leaves)}.")
        a = np.asarray(leaves[n])
        alive = np.any(a.reshape(-1, a.shape[-1]) != 0, axis=0)
        out.append(float(alive.mean()))
    return np.asarray(out)


@dataclasses.dataclass(frozen=True)
class BilinearFit:
    """How well a :class:`BilinearEnergy` fits its samples.

    Attributes:
        r2: coefficient of determination on the samples.
        rmse: root mean squared error, in energy units.
        max_relative_error: the largest ``|fit - measured| / measured``.
        samples: how many (configuration, energy) samples were fitted.
    """

    r2: float
    rmse: float
    max_relative_error: float
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BilinearEnergy:
    """ECC's energy model (Yang et al., CVPR 2019): bilinear in kept channel fractions.

        E(s) = b0 + sum_{j=1}^{L} a_j s_{j-1} s_j,

    with ``s_j`` the kept fraction of layer j's output channels and ``s_0``
    the kept fraction of the network's input (1). It models structured
    (channel) pruning, where a layer's cost scales with both its input and
    output widths. Fit it to measurements with :meth:`fit`.

    Attributes:
        layers: the kernel names of layers 1..L, in order.
        b0: the constant term (also the floor: every channel pruned).
        a: the coefficients a_1..a_L.
        input_kept: s_0.
    """

    layers: tuple[str, ...]
    b0: float
    a: tuple[float, ...]
    input_kept: float = 1.0

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.a):
            raise ValueError(f"{len(self.layers)} layers but {len(self.a)} coefficients.")

    def terms(self, kept: Sequence[float]) -> np.ndarray:
        """``a_j s_{j-1} s_j`` for every layer, given the kept fractions s_1..s_L."""
        s = np.concatenate([[self.input_kept], np.asarray(kept, np.float64)])
        return np.asarray(self.a) * s[:-1] * s[1:]

    def energy_of(self, kept: Sequence[float]) -> float:
        """``E(s)`` for kept channel fractions s_1..s_L."""
        return self.b0 + float(self.terms(kept).sum())

    def per_layer(self, params: PyTree) -> dict[str, float]:
        terms = self.terms(kept_channels(params, self.layers))
        return dict(zip(self.layers, map(float, terms), strict=True))

    def energy(self, params: PyTree) -> float:
        return self.energy_of(kept_channels(params, self.layers))

    def dense(self) -> float:
        return self.energy_of(np.ones(len(self.layers)))

    def floor(self) -> float:
        return self.b0

    def describe(self) -> dict[str, Any]:
        return {"type": "bilinear", "layers": list(self.layers), "b0": self.b0, "a": list(self.a)}

    @classmethod
    def fit(
        cls,
        layers: Sequence[str],
        kept: np.ndarray,
        energy: np.ndarray,
        *,
        input_kept: float = 1.0,
    ) -> tuple[BilinearEnergy, BilinearFit]:
        """Least-squares fit of b0 and a_j >= 0 to measured (configuration, energy) pairs.

        The model is linear in its coefficients, so this is a bounded linear
        least-squares problem (``scipy.optimize.lsq_linear``; nonnegative
        coefficients, since no layer gives energy back).

        Args:
            layers: kernel names of layers 1..L.
            kept: ``(m, L)`` kept channel fractions of the m measured configurations.
            energy: ``(m,)`` measured energies.

        Returns:
            The fitted model and its :class:`BilinearFit`.
        """
        from scipy.optimize import lsq_linear

        kept = np.asarray(kept, np.float64)
        energy = np.asarray(energy, np.float64)
        n_layers = len(layers)
        if kept.ndim != 2 or kept.shape[1] != n_layers or energy.shape != (kept.shape[0],):
            raise ValueError(
                f"kept must be (m, {n_layers}) and energy (m,), got {kept.shape} and "
                f"{energy.shape}."
            )
        if kept.shape[0] < n_layers + 1:
            raise ValueError(
                f"{kept.shape[0]} samples cannot determine {n_layers + 1} coefficients; "
                f"measure at least {n_layers + 1} configurations."
            )
        s = np.concatenate([np.full((kept.shape[0], 1), input_kept), kept], axis=1)
        design = np.concatenate([np.ones((kept.shape[0], 1)), s[:, :-1] * s[:, 1:]], axis=1)
        sol = lsq_linear(design, energy, bounds=(0.0, np.inf))
        model = cls(tuple(layers), float(sol.x[0]), tuple(map(float, sol.x[1:])), input_kept)
        pred = design @ sol.x
        resid = pred - energy
        ss_tot = float(np.sum((energy - energy.mean()) ** 2))
        r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
        rel = np.abs(resid) / np.maximum(np.abs(energy), 1e-300)
        return model, BilinearFit(
            r2, float(np.sqrt(np.mean(resid**2))), float(rel.max()), int(kept.shape[0])
        )


# ---------------------------------------------------------------------------
# The energy budget


@functools.partial(jax.jit, static_argnames=("specs",))
def _greedy_leaves(
    leaves: list[jax.Array], capacity: jax.Array, specs: tuple[tuple[int, float, float, float], ...]
) -> tuple[list[jax.Array], tuple[jax.Array, ...]]:
    values, costs = [], []
    for i, c1, c2, kink in specs:
        v = leaves[i].ravel().astype(jnp.float32)
        values.append(v * v)
        costs.append(_weight_costs(jnp, v, c1, c2, kink))
    flat, *stats = greedy_core(jnp.concatenate(values), jnp.concatenate(costs), capacity)
    masks = [jnp.ones(leaf.shape, bool) for leaf in leaves]
    offset = 0
    for i, *_ in specs:
        size = leaves[i].size
        masks[i] = flat[offset : offset + size].reshape(leaves[i].shape)
        offset += size
    return masks, tuple(stats)


def _weight_costs(xp: Any, v: Any, c1: float, c2: float, kink: float) -> Any:
    """Per-weight costs of one layer: its ``kink`` largest |v| cost c1, the rest c2.

    With a convex kink (c2 >= c1) this assignment is exact for every kept set
    the greedy and the optimum choose (both keep a layer's largest weights
    first), and it never undercounts any other set: a set of n weights
    costs at least ``E_l(n) - floor_l``, the n cheapest costs.
    """
    n = v.shape[0]
    if kink >= n or c1 == c2:
        return xp.full((n,), c1, dtype=xp.float64)
    if xp is np:
        order = np.argsort(-np.abs(v), kind="stable")
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
    else:
        order = jnp.argsort(-jnp.abs(v), stable=True)
        rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return xp.where(rank < kink, c1, c2).astype(xp.float64)


@dataclasses.dataclass(frozen=True)
class EnergyBudget:
    """An energy budget: ``S = {W : E(W) <= B}`` for a layer-wise energy model.

    Say how much with exactly one of ``fraction`` (B as a fraction of the
    model's dense energy) or ``energy`` (B in the model's own units). The
    leaves the model costs are the prunable ones.

    The projection onto S is the knapsack

        minimize ||Z - V||^2  s.t.  sum_i c_i [z_i != 0] <= B - floor,

    with per-weight costs from the model (a convolution's weights beyond the
    kernel cache cost c2, the rest c1; the largest-magnitude weights get the
    cheaper cost, which is exact for the sets the solvers choose). ``method``
    picks the solver: ``"greedy"`` (jit-compiled, value/cost ratio with an
    LP-relaxation bound; Yang, Zhu & Liu, ICLR 2019) or ``"exact"`` (a HiGHS
    MILP, for small networks). Call it outside ``jax.jit``: the greedy
    accumulates costs in float64.

    Raises:
        BudgetError: for a budget below the floor (every prunable weight
            zero), naming the smallest feasible budget.

    Examples:
        >>> model = AcceleratorEnergy(layer_shapes(LeNet5(nnx.Rngs(0)), (28, 28, 1)))
        >>> budget = EnergyBudget(model, fraction=0.12)
        >>> masks, stats = budget.project_with_stats(params)
    """

    model: LayerwiseEnergy
    fraction: float | None = None
    energy: float | None = None
    method: Literal["greedy", "exact"] = "greedy"
    time_limit: float = 30.0
    progress: float = 1.0

    def __post_init__(self) -> None:
        from admmprune.budgets import BudgetError

        if not isinstance(self.model, LayerwiseEnergy):
            raise BudgetError(
                f"EnergyBudget needs a layer-wise model with per-weight costs "
                f"(AcceleratorEnergy or LinearEnergy), got {type(self.model).__name__}."
            )
        given = [n for n in ("fraction", "energy") if getattr(self, n) is not None]
        if len(given) != 1:
            raise BudgetError(
                "EnergyBudget takes exactly one of fraction= or energy= "
                f"(got {', '.join(given) or 'none'}); e.g. EnergyBudget(model, fraction=0.12)."
            )
        if self.method not in ("greedy", "exact"):
            raise BudgetError(f"method must be 'greedy' or 'exact', got {self.method!r}.")
        dense, floor = self.model.dense(), self.model.floor()
        if self.fraction is not None:
            f = self.fraction
            if not (isinstance(f, int | float | np.number) and 0 < f <= 1):
                raise BudgetError(f"fraction must be in (0, 1], got {f!r}.")
        elif not (isinstance(self.energy, int | float | np.number) and self.energy >= 0):
            raise BudgetError(f"energy must be a non-negative number, got {self.energy!r}.")
        if self.target() < floor * (1 - 1e-12):
            smallest = math.ceil(floor / dense * 1e4) / 1e4
            raise BudgetError(
                f"energy budget {self.target():.6g} ({self.target() / dense:.2%} of dense) is "
                f"below the floor {floor:.6g} ({floor / dense:.2%} of dense), the energy with "
                f"every prunable weight zero; the smallest feasible budget is "
                f"fraction={smallest} (energy={floor:.6g})."
            )

    # ------------------------------------------------------------------ sizes
    def target(self) -> float:
        """The budget B in the model's units (at full progress)."""
        if self.energy is not None:
            return float(self.energy)
        return float(self.fraction) * self.model.dense()

    def limit(self) -> float:
        """The current budget: ``dense (B / dense) ** progress`` (B at progress 1)."""
        dense = self.model.dense()
        return dense * min(1.0, self.target() / dense) ** self.progress

    def _specs(self, params: PyTree) -> tuple[tuple[int, float, float, float], ...]:
        from admmprune.budgets import BudgetError

        names = leaf_names(params)
        index = {n: i for i, n in enumerate(names)}
        leaves = jax.tree.leaves(params)
        specs = []
        for c in self.model.costs():
            if c.name not in index:
                raise BudgetError(
                    f"the energy model costs {c.name!r}, which is not a leaf of params; "
                    f"leaves are {names}."
                )
            i = index[c.name]
            if int(np.size(leaves[i])) != c.size:
                raise BudgetError(
                    f"{c.name} has {np.size(leaves[i])} entries but the energy model "
                    f"expects {c.size}; build the model from this network."
                )
            specs.append((i, float(c.c1), float(c.c2), float(c.kink)))
        return tuple(specs)

    # ---------------------------------------------------------------- Budget
    def prunable(self, params: PyTree) -> list[bool]:
        costed = {c.name for c in self.model.costs()}
        return [n in costed for n in leaf_names(params)]

    def project_with_stats(self, params: PyTree) -> tuple[PyTree, KnapsackStats]:
        """The projection's mask and its knapsack figures (value, LP bound, cost)."""
        specs = self._specs(params)
        capacity = self.limit() - self.model.floor()
        leaves, treedef = jax.tree.flatten(params)
        if self.method == "greedy":
            with jax.enable_x64(True):
                masks, (removed, bound, cost, kept, _) = _greedy_leaves(
                    leaves, jnp.asarray(capacity, jnp.float64), specs
                )
                stats = KnapsackStats(
                    float(removed), float(bound), float(cost), capacity, int(kept)
                )
            return jax.tree.unflatten(treedef, masks), stats
        vs = [np.asarray(leaves[i], np.float32).ravel() for i, *_ in specs]
        costs = np.concatenate(
            [_weight_costs(np, v, c1, c2, k) for v, (_, c1, c2, k) in zip(vs, specs, strict=True)]
        )
        values = np.concatenate([v.astype(np.float64) ** 2 for v in vs])
        flat, stats = exact_knapsack(values, costs, capacity, time_limit=self.time_limit)
        masks_np = [np.ones(np.shape(leaf), bool) for leaf in leaves]
        offset = 0
        for i, *_ in specs:
            size = masks_np[i].size
            masks_np[i] = flat[offset : offset + size].reshape(masks_np[i].shape)
            offset += size
        return jax.tree.unflatten(treedef, [jnp.asarray(m) for m in masks_np]), stats

    def mask(self, params: PyTree) -> PyTree:
        """The support of the (greedy or exact) projection of ``params`` onto S."""
        return self.project_with_stats(params)[0]

    def relax(self, t: float) -> EnergyBudget:
        """The budget a fraction ``t`` of the way from dense (0) to this one (1).

        The budget interpolates geometrically, ``B_t = dense (B / dense) ** t``.
        """
        if not 0.0 <= t <= 1.0:
            from admmprune.budgets import BudgetError

            raise BudgetError(f"t must be a fraction in [0, 1], got {t!r}.")
        return dataclasses.replace(self, progress=float(t))

    def describe(self) -> dict[str, Any]:
        dense = self.model.dense()
        out: dict[str, Any] = {
            "type": "energy",
            "energy": self.target(),
            "fraction": self.target() / dense,
            "given_as": "fraction" if self.fraction is not None else "energy",
            "dense": dense,
            "floor": self.model.floor(),
            "method": self.method,
            "model": self.model.describe(),
        }
        return out

    def metrics(self, params: PyTree) -> dict[str, float]:
        """Energy of the nonzero pattern of ``params``, absolute and as a fraction of dense."""
        e = self.model.energy(params)
        return {"energy": e, "energy_fraction": e / self.model.dense()}
