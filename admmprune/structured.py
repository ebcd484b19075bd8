"""Structured budgets: channels kept, MACs, channel energy, residual branches, and N:M.

Each is a :class:`admmprune.Budget`, so ADMM, the baselines, one-shot refit,
recipes and reports take it like any other budget. The channel budgets act
on a :class:`admmprune.groups.Structure` (from :func:`admmprune.groups.derive`).

The set. For channel group g with producers P_g (the kernel slices, bias and
norm entries that compute its channels; see :mod:`admmprune.groups`) the
structured set keeping channel set K is ``S_K = {W : W_{P_g}[c] = 0 for every
removed channel c}``, and a budget allows the K whose count, MACs or energy
fits. Producers of different channels are disjoint, so

    ||Proj_{S_K}(V) - V||^2 = sum_{c not in K} ||v_c||^2,   v_c = V restricted to P_c,

and the projection keeps the K of largest kept energy ``sum_{c in K} ||v_c||^2``
among the allowed ones (for a count: the top-k of ``||v_c||^2``, exact). The
masks also drop the consumer slices of every removed channel: they multiply a
channel that is then exactly zero, so this changes nothing the network
computes and leaves the weights a compact export removes.

* :class:`ChannelBudget` -- a count or fraction of channels, global or per
  group (exact top-k, with a floor of ``min_channels`` per group so that no
  layer is cut);
* :class:`MacsBudget` -- MACs per example at most a fraction of dense: the
  cost ``sum_l u_l r_l(s) c_l(s)`` is bilinear in adjacent groups' counts, not
  separable. The projection keeps, in each group, its top channels (for fixed
  counts that is optimal), and chooses the counts greedily (drop the channel
  of least energy per MAC saved, then add back what fits); ``exact=True``
  solves the counts as a MILP whose products of one-hot count variables are
  linearized exactly (HiGHS, small instances). ``units="branches"`` prunes
  whole residual branches instead (depth), exactly by enumeration;
* :class:`NMBudget` -- N:M along each kernel's reduction axis (axis 0 of a
  flax ``(in, out)`` kernel, the flattened ``(kh, kw, in)`` of a HWIO conv):
  each block of M consecutive weights keeps its N largest (exact).

References:
    W. Wen et al., "Learning Structured Sparsity in Deep Neural Networks",
    NIPS 2016; T. Zhang et al., "StructADMM", 2019; H. Yang et al., "ECC",
    CVPR 2019; A. Mishra et al., "Accelerating Sparse Deep Neural Networks"
    (2:4), 2021.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, leaf_names, named_leaves
from admmprune.budgets import BudgetError, Pricing, Projection, _largest_remainder
from admmprune.groups import LayerCost, Structure
from admmprune.projections import topk_mask_flat


@runtime_checkable
class StructuredBudget(Protocol):
    """A budget over the channel groups of a :class:`Structure` (ChannelBudget, MacsBudget).

    Besides the :class:`admmprune.Budget` protocol it has its ``structure``
    and ``project_by(params, scores)``: the budget's channels chosen by any
    per-channel ranking (the L1-filter and network-slimming baselines).
    """

    structure: Structure

    def project_by(self, params: PyTree, scores: Mapping[str, jax.Array]) -> Projection: ...


def _ceil_sig(x: float, digits: int = 4) -> str:
    """``x`` rounded *up* to ``digits`` significant digits (a feasible suggestion)."""
    if x <= 0:
        return "0"
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return f"{math.ceil(x * scale - 1e-9) / scale:.{digits}g}"


def _flags(params: PyTree, names: set[str]) -> list[bool]:
    return [n in names for n in leaf_names(params)]


def _member_leaves(structure: Structure) -> set[str]:
    out = {m.leaf for g in structure.groups for m in g.members}
    for b in structure.branches:
        out |= set(b.leaves)
    return out


def _no_pricing(what: str) -> BudgetError:
    return BudgetError(
        f"a {what} keeps whole channels, not a kept-weight total to divide among layers; "
        'drop layer_allocation = "obs" and use method = "refit" for one-shot pruning.'
    )


def _counts_of(keep: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {k: int(np.asarray(v).sum()) for k, v in keep.items()}


def _top_channels(scores: jax.Array, count: int) -> jax.Array:
    return topk_mask_flat(scores, int(count))


@dataclasses.dataclass(frozen=True)
class ChannelBudget:
    """At most ``k`` channels kept, over the groups of a :class:`Structure`.

    Say how many with one of ``keep`` (a fraction of all channels), ``count``
    or ``per_layer`` (group name -> kept fraction (float) or count (int);
    groups not named stay whole). ``allocation="global"`` ranks all channels
    together, keeping at least ``min_channels`` of every group, so no layer is
    cut; ``"uniform"`` keeps the same fraction of every group (largest
    remainder). Per-layer and uniform counts must be at least 1 in every
    group (:meth:`check`).

    The projection keeps the top-k channels by producer energy ``||v_c||^2``
    (exact; see the module docstring).
    """

    structure: Structure
    keep: float | None = None
    count: int | None = None
    per_layer: Mapping[str, float | int] | None = None
    allocation: Literal["global", "uniform"] = "global"
    min_channels: int = 1

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.keep, self.count, self.per_layer)]
        if sum(given) != 1:
            raise BudgetError("give exactly one of keep=, count= or per_layer=.")
        if self.keep is not None and not 0.0 <= self.keep <= 1.0:
            raise BudgetError(f"keep must be a fraction in [0, 1], got {self.keep}.")
        if self.min_channels < 1:
            raise BudgetError(
                "min_channels must be at least 1: a layer with no channel cuts the network."
            )
        if self.per_layer is not None:
            object.__setattr__(self, "per_layer", dict(self.per_layer))
            names = {g.name for g in self.structure.groups}
            unknown = sorted(set(self.per_layer) - names)
            if unknown:
                raise BudgetError(
                    f"per_layer names {unknown}, which are not channel groups; groups are "
                    f"{sorted(names)}."
                )

    def __hash__(self) -> int:
        return hash(
            (
                self.structure,
                self.keep,
                self.count,
                self.allocation,
                self.min_channels,
                tuple(sorted((self.per_layer or {}).items())),
            )
        )

    @property
    def total(self) -> int:
        return sum(g.size for g in self.structure.groups)

    def counts(self) -> dict[str, int]:
        """Kept channels per group (for ``per_layer`` and ``uniform``), or {} (global)."""
        sizes = self.structure.sizes
        if self.per_layer is not None:
            out = {}
            for name, v in self.per_layer.items():
                k = round(v * sizes[name]) if isinstance(v, float) else int(v)
                out[name] = k
            return out
        if self.allocation == "uniform":
            shares = _largest_remainder(self._k(), list(sizes.values()))
            return dict(zip(sizes, shares, strict=True))
        return {}

    def _k(self) -> int:
        return round(self.keep * self.total) if self.keep is not None else int(self.count)

    def prunable(self, params: PyTree) -> list[bool]:
        return _flags(params, _member_leaves(self.structure))

    def select(self, scores: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The kept channels given per-channel scores (any ranking: energy, L1, |gamma|)."""
        counts = self.counts()
        if counts:
            return {
                g.name: _top_channels(scores[g.name], counts[g.name])
                if g.name in counts
                else jnp.ones(g.size, bool)
                for g in self.structure.groups
            }
        # Global: every group's top min_channels are kept first (a floor), then the best rest.
        parts, sizes = [], []
        for g in self.structure.groups:
            s = jnp.asarray(scores[g.name], jnp.float32)
            top = _top_channels(s, min(self.min_channels, g.size))
            parts.append(jnp.where(top, jnp.inf, jnp.nan_to_num(s, nan=-1.0)))
            sizes.append(g.size)
        flat = topk_mask_flat(jnp.concatenate(parts), self._k())
        out, offset = {}, 0
        for g, n in zip(self.structure.groups, sizes, strict=True):
            out[g.name] = flat[offset : offset + n]
            offset += n
        return out

    def project(self, params: PyTree) -> Projection:
        return self.project_by(params, self.structure.scores(params))

    def project_by(self, params: PyTree, scores: Mapping[str, jax.Array]) -> Projection:
        """The budget's channels chosen by other scores (L1 norms, BatchNorm scales)."""
        keep = self.select(scores)
        return Projection(self.structure.masks(params, keep), {})

    def measure(self, params: PyTree) -> dict[str, float]:
        channels, _ = self.structure.kept(jax.tree.map(lambda x: x != 0, params))
        return {"channels": float(sum(int(v.sum()) for v in channels.values()))}

    def check(self, params: PyTree) -> None:
        self.structure.check(params)
        sizes = self.structure.sizes
        floor = sum(min(self.min_channels, s) for s in sizes.values())
        counts = self.counts()
        if counts:
            for name, k in counts.items():
                if not 1 <= k <= sizes[name]:
                    raise BudgetError(
                        f"group {name!r}: {k} of {sizes[name]} channels kept; keep between 1 "
                        f"and {sizes[name]} (0 would cut the network)."
                    )
        elif not floor <= self._k() <= self.total:
            raise BudgetError(
                f"{self._k()} channels kept, but every one of the {len(sizes)} groups keeps at "
                f"least {self.min_channels} (the network would be cut): keep at least "
                f"{floor} of {self.total} (keep >= {_ceil_sig(floor / self.total)})."
            )

    def relax(self, t: float) -> ChannelBudget:
        if self.per_layer is not None:
            sizes = self.structure.sizes
            return dataclasses.replace(
                self,
                per_layer={
                    n: round(sizes[n] - t * (sizes[n] - k)) for n, k in self.counts().items()
                },
            )
        return dataclasses.replace(
            self, keep=None, count=round(self.total - t * (self.total - self._k()))
        )

    def pricing(self, params: PyTree) -> Pricing:
        raise _no_pricing("channel budget")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "channels",
            "allocation": self.allocation,
            "min_channels": self.min_channels,
            "total_channels": self.total,
        }
        if self.per_layer is not None:
            out["per_layer"] = self.counts()
        else:
            out["kept_channels"] = self._k()
        return out


@dataclasses.dataclass(frozen=True)
class MacsBudget:
    """MACs per example at most ``keep`` times the dense network's (a fraction of MACs).

    ``units="channels"`` removes channels (every group keeps at least
    ``min_channels``); ``units="branches"`` removes whole residual branches.
    The MACs are counted on the network the masks leave (the compact one).

    Args:
        structure: the network's groups and layer costs.
        keep: the allowed fraction of dense MACs, in (0, 1].
        macs: or the allowed MACs per example.
        exact: solve the counts exactly (a MILP; small networks) instead of
            the greedy.
        bound: also report how far the projection can be from optimal: the
            LP relaxation of the MILP bounds the kept energy from above, so
            ``projection_gap = removed - (total - bound) >= 0`` certifies the
            greedy's answer (figures ``projection_removed``, ``projection_gap``;
            one LP per projection).
        round_to: every group keeps a multiple of ``round_to`` channels (or
            all of them), as Torch-Pruning's ``round_to``: vector units and
            matmul kernels run widths that are multiples of 8 or 16 much
            faster than odd ones, so rounded counts turn saved MACs into saved
            time. The floor is ``min_channels`` rounded up to a multiple.
    """

    structure: Structure
    keep: float | None = None
    macs: float | None = None
    units: Literal["channels", "branches"] = "channels"
    min_channels: int = 1
    exact: bool = False
    bound: bool = False
    round_to: int = 1

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.macs is None):
            raise BudgetError("give exactly one of keep= (a fraction of dense MACs) or macs=.")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise BudgetError(
                f"keep must be a fraction of the dense MACs in (0, 1], got {self.keep}."
            )
        if self.units not in ("channels", "branches"):
            raise BudgetError(f'units must be "channels" or "branches", got {self.units!r}.')
        if self.units == "branches" and not self.structure.branches:
            raise BudgetError(
                'units = "branches" needs residual branches (models.Residual); the model has none.'
            )
        if self.round_to < 1:
            raise BudgetError(f"round_to must be at least 1 (1: any count), got {self.round_to}.")

    def least(self, size: int) -> int:
        """The fewest channels a group of ``size`` may keep: ``min_channels``, rounded up."""
        r = self.round_to
        return min(size, -(-max(self.min_channels, 1) // r) * r)

    def allowed(self, size: int) -> np.ndarray:
        """The counts a group of ``size`` may keep: multiples of ``round_to``, or all of them."""
        r = self.round_to
        counts = np.arange(0, size + 1)
        return counts[((counts % r == 0) | (counts == size)) & (counts >= self.least(size))]

    @property
    def capacity(self) -> float:
        return float(self.macs) if self.macs is not None else self.keep * self.structure.dense_macs

    def floor(self) -> float:
        """The fewest MACs the budget can reach (every group at its floor / no branch)."""
        if self.units == "branches":
            return self.structure.macs({}, {b.name: False for b in self.structure.branches})
        return self.structure.macs({g.name: self.least(g.size) for g in self.structure.groups})

    def prunable(self, params: PyTree) -> list[bool]:
        return _flags(params, _member_leaves(self.structure))

    def select(self, scores: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Kept channels for per-channel ``scores``: counts by greedy/MILP, top channels."""
        host = {k: np.asarray(v, np.float64) for k, v in scores.items()}
        counts = _exact_counts(self, host)[0] if self.exact else _greedy_counts(self, host)
        return {
            g.name: _top_channels(jnp.asarray(scores[g.name]), counts[g.name])
            for g in self.structure.groups
        }

    def select_branches(self, params: PyTree) -> dict[str, bool]:
        """The kept branches: the most branch energy whose MACs fit (exact, by enumeration)."""
        by_name = named_leaves(params)
        branches = self.structure.branches
        stats = self.structure.statistics  # measured, not weights: no part of the value
        energy = [
            sum(float(jnp.sum(jnp.square(by_name[x]))) for x in b.leaves if x not in stats)
            for b in branches
        ]
        if len(branches) > 16:
            raise BudgetError(f"{len(branches)} branches: the exact enumeration takes at most 16.")
        best, best_value = None, -1.0
        for kept in itertools.product((True, False), repeat=len(branches)):
            flags = {b.name: k for b, k in zip(branches, kept, strict=True)}
            if self.structure.macs({}, flags) <= self.capacity + 1e-9:
                value = sum(e for e, k in zip(energy, kept, strict=True) if k)
                if value > best_value:
                    best, best_value = flags, value
        assert best is not None  # check() guarantees the all-removed network fits
        return best

    def project(self, params: PyTree) -> Projection:
        if self.units == "branches":
            kept = self.select_branches(params)
            masks = self.structure.masks(params, {}, kept)
            macs = self.structure.macs({}, kept)
            return Projection(masks, self._figures(macs))
        return self.project_by(params, self.structure.scores(params))

    def project_by(self, params: PyTree, scores: Mapping[str, jax.Array]) -> Projection:
        """The budget's channels chosen by other scores (L1 norms, BatchNorm scales)."""
        if self.units == "branches":
            raise BudgetError(
                'a budget over residual branches (units = "branches") ranks branches, not '
                "channels: use ADMM or magnitude pruning with it."
            )
        keep = self.select(scores)
        masks = self.structure.masks(params, keep)
        figures = self._figures(self.structure.macs(_counts_of(keep)))
        if self.bound:
            host = {k: np.asarray(v, np.float64) for k, v in scores.items()}
            total = sum(float(np.nansum(v)) for v in host.values())
            kept = sum(float(np.nansum(host[k][np.asarray(v)])) for k, v in keep.items())
            _, upper = _exact_counts(self, host, integral=False)
            figures |= {
                "projection_removed": total - kept,
                "projection_gap": max(0.0, upper - kept),
            }
        return Projection(masks, figures)

    _what = "MACs"

    def _figures(self, macs: float) -> dict[str, float]:
        return {"macs": macs, "macs_fraction": macs / self.structure.dense_macs}

    def measure(self, params: PyTree) -> dict[str, float]:
        macs = self.structure.macs_of(jax.tree.map(lambda x: x != 0, params))
        return {"macs": macs, "macs_fraction": macs / self.structure.dense_macs}

    def check(self, params: PyTree) -> None:
        self.structure.check(params)
        floor = self.floor()
        if self.capacity < floor - 1e-9:
            what = (
                "with every residual branch removed"
                if self.units == "branches"
                else (
                    f"with {self.min_channels} channel(s) left in every group"
                    + (f" (rounded up to a multiple of {self.round_to})" * (self.round_to > 1))
                    + " (the layers that cannot be pruned cost the rest)"
                )
            )
            raise BudgetError(
                f"the {self._what} budget, {self.capacity:.6g} per example, is below the smallest "
                f"reachable, {floor:.6g} {what}; use keep >= "
                f"{_ceil_sig(floor / self.structure.dense_macs)} of the dense "
                f"{self.structure.dense_macs}."
            )

    def relax(self, t: float) -> MacsBudget:
        dense = self.structure.dense_macs
        return dataclasses.replace(self, keep=None, macs=dense - t * (dense - self.capacity))

    def pricing(self, params: PyTree) -> Pricing:
        raise _no_pricing("MACs budget")

    def describe(self) -> dict[str, Any]:
        return {
            "type": "macs",
            "units": self.units,
            "macs": self.capacity,
            "dense_macs": self.structure.dense_macs,
            "keep": self.capacity / self.structure.dense_macs,
            "reduction": self.structure.dense_macs / self.capacity,
            "min_channels": self.min_channels,
            "exact": self.exact,
            "bound": self.bound,
        } | self._rounding()

    def _rounding(self) -> dict[str, int]:
        return {"round_to": self.round_to} if self.round_to > 1 else {}


def energy_structure(structure: Structure, model: Any) -> Structure:
    """``structure`` with every layer's cost replaced by ECC's energy term.

    ECC (Yang et al., CVPR 2019) models the energy as
    ``E = b0 + sum_j a_j s_in(j) s_out(j)`` in kept channel *fractions*
    (:class:`admmprune.bilinear.BilinearEnergy`; its chain ``s_{j-1} s_j``
    is the sequential case). A layer's cost here is bilinear in its input and
    output groups' kept counts, so the layer's term becomes a cost of dense
    value ``a_j`` on the same groups, and ``b0`` a constant; every MACs
    projection then works on energy unchanged.
    """
    terms = dict(zip(model.layers, model.a, strict=True))
    unknown = sorted(set(terms) - {layer.kernel for layer in structure.layers})
    if unknown:
        raise BudgetError(
            f"the energy model names layers {unknown} the network does not have; its layers "
            f"are {[layer.kernel for layer in structure.layers]}."
        )
    layers = [
        dataclasses.replace(x, macs=float(terms.get(x.kernel, 0.0))) for x in structure.layers
    ]
    layers.append(LayerCost("(constant)", float(model.b0), None, None, (1,), 1))
    return dataclasses.replace(structure, layers=tuple(layers))


def fit_channel_energy(
    structure: Structure,
    energy: Any,
    params: PyTree,
    *,
    samples: int = 64,
    seed: int = 0,
    min_channels: int = 1,
) -> tuple[Any, Any]:
    """ECC's bilinear energy model, fitted to ``energy`` measured on channel-pruned networks.

    ECC (Yang et al., CVPR 2019) measures sampled channel configurations and
    fits ``E ~ b0 + sum_j a_j f_j`` with ``a_j >= 0``, where ``f_j`` is the
    fraction of layer j's dense MACs that the configuration keeps (``s_in(j)
    s_out(j)`` in kept channel fractions; bounded least squares,
    :func:`admmprune.bilinear.fit_terms`). Here a configuration keeps the first
    ``k_g`` channels of every prunable group, ``k_g`` uniform in ``[min_channels,
    size]`` (seeded), and is measured by ``energy.energy(masks)`` on its
    masks, consumers included; the dense network is one of the ``samples``.
    Any energy model with ``energy(params)`` works, e.g. the issue-5
    :class:`admmprune.energy.AcceleratorEnergy`.

    Returns:
        ``(BilinearEnergy over the structure's kernels, BilinearFit)``.
    """
    from admmprune.bilinear import BilinearEnergy, fit_terms

    if samples < len(structure.layers) + 2:
        raise BudgetError(
            f"samples={samples} cannot fit {len(structure.layers) + 1} coefficients "
            f"reliably; use at least {len(structure.layers) + 2}."
        )
    rng = np.random.default_rng(seed)
    groups = structure.groups
    kernels = list(dict.fromkeys(layer.kernel for layer in structure.layers))
    dense = structure.layer_macs({g.name: g.size for g in groups})
    terms, measured = [], []
    for i in range(samples):
        counts = {
            g.name: g.size if i == 0 else int(rng.integers(min(min_channels, g.size), g.size + 1))
            for g in groups
        }
        keep = {g.name: np.arange(g.size) < counts[g.name] for g in groups}
        macs = structure.layer_macs(counts)
        terms.append([macs[k] / dense[k] if dense[k] else 0.0 for k in kernels])
        measured.append(energy.energy(structure.masks(params, keep)))
    coef, fit = fit_terms(np.asarray(terms), np.asarray(measured))
    return BilinearEnergy(tuple(kernels), float(coef[0]), tuple(map(float, coef[1:]))), fit


@dataclasses.dataclass(frozen=True)
class ChannelEnergyBudget(MacsBudget):
    """Energy at most ``keep`` of the dense network's, under ECC's bilinear channel model.

    The same projection as :class:`MacsBudget` (greedy counts, or the exact
    MILP), on the layer costs of :func:`energy_structure`. ``macs=`` is the
    absolute energy here.

    Example:
        >>> ChannelEnergyBudget(structure, keep=0.5, model=BilinearEnergy.fit(...))
    """

    model: Any = None
    fit: Any = None  # the model's BilinearFit, reported by describe
    _what = "energy"

    def __post_init__(self) -> None:
        if self.model is None:
            raise BudgetError("ChannelEnergyBudget needs model= (a BilinearEnergy).")
        if self.units != "channels":
            raise BudgetError('ChannelEnergyBudget prunes channels (units = "channels").')
        object.__setattr__(self, "structure", energy_structure(self.structure, self.model))
        super().__post_init__()

    def _figures(self, macs: float) -> dict[str, float]:
        return {"energy": macs, "energy_fraction": macs / self.structure.dense_macs}

    def measure(self, params: PyTree) -> dict[str, float]:
        return self._figures(self.structure.macs_of(jax.tree.map(lambda x: x != 0, params)))

    def describe(self) -> dict[str, Any]:
        return (
            {
                "type": "channel_energy",
                "energy": self.capacity,
                "dense_energy": self.structure.dense_macs,
                "energy_fraction": self.capacity / self.structure.dense_macs,
                "model": self.model.describe(),
                "min_channels": self.min_channels,
                "exact": self.exact,
            }
            | self._rounding()
            | ({} if self.fit is None else {"fit": dataclasses.asdict(self.fit)})
        )


def _sorted_desc(s: np.ndarray) -> np.ndarray:
    return -np.sort(-np.nan_to_num(s, nan=-np.inf), kind="stable")


class _MacsModel:
    """The MACs of every layer as arrays, for fast trial counts (one row per layer)."""

    def __init__(self, st: Structure) -> None:
        self.names = [g.name for g in st.groups]
        pos = {n: i for i, n in enumerate(self.names)}
        layers = st.layers
        self.unit = np.array([layer.unit for layer in layers])
        self.a = np.array([pos.get(layer.inputs, -1) if layer.inputs else -1 for layer in layers])
        self.b = np.array([pos.get(layer.outputs, -1) if layer.outputs else -1 for layer in layers])
        self.per = np.array([sum(layer.in_positions) / len(layer.in_positions) for layer in layers])
        self.rows0 = np.array([float(sum(layer.in_positions)) for layer in layers])
        self.cols0 = np.array([float(layer.out_width) for layer in layers])
        g = len(self.names)
        self.in_a = (self.a[:, None] == np.arange(g)[None, :]).astype(float)
        self.in_b = (self.b[:, None] == np.arange(g)[None, :]).astype(float)

    def parts(self, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.where(self.a >= 0, self.per * s[np.maximum(self.a, 0)], self.rows0)
        cols = np.where(self.b >= 0, s[np.maximum(self.b, 0)], self.cols0)
        return rows, cols

    def total(self, s: np.ndarray) -> float:
        rows, cols = self.parts(s)
        return float(np.sum(self.unit * rows * cols))

    def trials(self, s: np.ndarray, step: int | np.ndarray) -> np.ndarray:
        """The MACs after changing group g's count by ``step[g]`` alone (one entry per group)."""
        rows, cols = self.parts(s)
        step = np.broadcast_to(np.asarray(step, float), (len(self.names),))[None, :]
        r = rows[:, None] + step * self.per[:, None] * self.in_a
        c = cols[:, None] + step * self.in_b
        return np.sum(self.unit[:, None] * r * c, axis=0)


def _greedy_counts(budget: MacsBudget, scores: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Counts per group by greedy removal, then add-back, under the MACs capacity.

    Each step lowers the count of the group whose lost energy per MAC saved
    is smallest to its next allowed count (one channel fewer, or the next
    multiple of ``round_to``); when the network fits, the counts are raised
    back while they still fit, best energy per MAC first.
    """
    st = budget.structure
    model = _MacsModel(st)
    sizes = np.array([g.size for g in st.groups])
    width = int(sizes.max()) + 1
    # pad[i, k]: group i's (k+1)-th best energy; one channel's change is read from it
    # exactly, a change of several from the prefix sums
    pad = np.zeros((len(sizes), width))
    for i, n in enumerate(model.names):
        o = _sorted_desc(scores[n])
        pad[i, : len(o)] = np.maximum(o, 0.0)
    prefix = np.concatenate([np.zeros((len(sizes), 1)), np.cumsum(pad, axis=1)], axis=1)

    def energy(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The energy of ranks lo..hi-1 of every group (prefix: of the top k)."""
        one = pad[rows, np.clip(lo, 0, width - 1)]
        return np.where(hi - lo == 1, one, prefix[rows, hi] - prefix[rows, np.maximum(lo, 0)])

    rows = np.arange(len(sizes))
    r = budget.round_to
    floor = np.array([budget.least(int(n)) for n in sizes])
    s = sizes.astype(np.int64).copy()
    cap = budget.capacity + 1e-9
    macs = model.total(s.astype(float))

    def lower(s: np.ndarray) -> np.ndarray:
        return np.where(s % r == 0, s - r, s - s % r) if r > 1 else s - 1

    def upper(s: np.ndarray) -> np.ndarray:
        return np.minimum(s - s % r + r, sizes) if r > 1 else s + 1

    while macs > cap:
        down = lower(s)
        trial = model.trials(s.astype(float), down - s)
        saved = macs - trial
        lost = energy(down, s)
        ok = (down >= floor) & (saved > 0)
        ratio = np.where(ok, lost / np.where(saved > 0, saved, 1), np.inf)
        g = int(np.argmin(ratio))
        if not np.isfinite(ratio[g]):
            break
        s[g] = down[g]
        macs = float(trial[g])
    while True:  # raise the count whose gain per MAC is best while it still fits
        up = upper(s)
        trial = model.trials(s.astype(float), up - s)
        gain = energy(s, up)
        ok = (s < sizes) & (trial <= cap)
        ratio = np.where(ok, gain / np.maximum(trial - macs, 1e-12), -np.inf)
        g = int(np.argmax(ratio))
        if not ok[g]:
            break
        s[g] = up[g]
        macs = float(trial[g])
    return {n: int(k) for n, k in zip(model.names, s, strict=True)}


def _exact_counts(
    budget: MacsBudget, scores: Mapping[str, np.ndarray], integral: bool = True
) -> tuple[dict[str, int], float]:
    """Counts per group maximizing kept energy under the MACs capacity, as a MILP.

    One-hot ``z[g, s]`` picks group g's count s (its value is the prefix sum of
    its sorted energies); a layer between groups a and b costs
    ``u * p_a * s * t`` on ``w[s, t] = z[a, s] z[b, t]``, linearized exactly by
    its marginals ``sum_t w[s, t] = z[a, s]``, ``sum_s w[s, t] = z[b, t]``,
    ``w >= 0`` (with one-hot z they leave exactly ``w[s*, t*] = 1``). Solved by
    HiGHS; with ``integral=False`` the LP relaxation, whose value bounds the
    kept energy of every feasible choice from above.

    Returns:
        ``(counts, kept energy)``; for the relaxation, the counts are those of
        the largest z entry per group (not necessarily feasible).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    st = budget.structure
    groups = list(st.groups)
    offsets, var = {}, 0
    for g in groups:
        offsets[g.name] = var
        var += g.size + 1
    value = np.zeros(var)
    for g in groups:
        prefix = np.concatenate([[0.0], np.cumsum(_sorted_desc(scores[g.name]))])
        value[offsets[g.name] : offsets[g.name] + g.size + 1] = prefix
    # cost terms
    cost_lin = np.zeros(var)
    const = 0.0
    pairs = []
    for layer in st.layers:
        a, b = layer.inputs, layer.outputs
        per = sum(layer.in_positions) / len(layer.in_positions) if a is not None else None
        if a is None and b is None:
            const += layer.macs
        elif a is None:
            for t in range(st.group(b).size + 1):
                cost_lin[offsets[b] + t] += layer.unit * sum(layer.in_positions) * t
        elif b is None:
            for s in range(st.group(a).size + 1):
                cost_lin[offsets[a] + s] += layer.unit * per * s * layer.out_width
        else:
            pairs.append((a, b, layer.unit * per))
    pair_vars = []
    for a, b, coef in pairs:
        na, nb = st.group(a).size + 1, st.group(b).size + 1
        pair_vars.append((a, b, coef, var, na, nb))
        var += na * nb
    c = np.zeros(var)
    c[: len(value)] = -value
    # row 0: the MACs; rows 1..G: one-hot counts; then w >= z_a + z_b - 1 per product
    ri, ci, vi = [np.zeros(len(cost_lin), int)], [np.arange(len(cost_lin))], [cost_lin]
    lb, ub = [-np.inf], [budget.capacity - const]
    r = 1
    for g in groups:
        n = g.size + 1
        ri.append(np.full(n, r))
        ci.append(offsets[g.name] + np.arange(n))
        vi.append(np.ones(n))
        lb.append(1.0)
        ub.append(1.0)
        r += 1
    for a, b, coef, start, na, nb in pair_vars:
        s_idx, t_idx = (x.ravel() for x in np.meshgrid(np.arange(na), np.arange(nb), indexing="ij"))
        w_idx = start + np.arange(na * nb)
        ri.append(np.zeros(na * nb, int))
        ci.append(w_idx)
        vi.append(coef * s_idx * t_idx)
        # marginals: sum_t w[s, t] = z[a, s] and sum_s w[s, t] = z[b, t]
        ri += [r + s_idx, r + np.arange(na), r + na + t_idx, r + na + np.arange(nb)]
        ci += [w_idx, offsets[a] + np.arange(na), w_idx, offsets[b] + np.arange(nb)]
        vi += [np.ones(na * nb), -np.ones(na), np.ones(na * nb), -np.ones(nb)]
        lb += [0.0] * (na + nb)
        ub += [0.0] * (na + nb)
        r += na + nb
    A = coo_matrix((np.concatenate(vi), (np.concatenate(ri), np.concatenate(ci))), shape=(r, var))
    lb, ub = np.asarray(lb), np.asarray(ub)
    upper = np.zeros(var)
    upper[len(value) :] = 1.0
    for g in groups:  # a group's count is one of its allowed ones
        upper[offsets[g.name] + budget.allowed(g.size)] = 1.0
    integrality = np.zeros(var)
    integrality[: len(value)] = 1 if integral else 0
    res = milp(
        c,
        constraints=LinearConstraint(A.tocsr(), lb, ub),
        integrality=integrality,
        bounds=Bounds(np.zeros(var), upper),
    )
    if res.x is None:
        raise BudgetError(f"the MACs MILP found no solution ({res.message}).")
    counts = {
        g.name: int(np.argmax(res.x[offsets[g.name] : offsets[g.name] + g.size + 1]))
        for g in groups
    }
    return counts, float(-res.fun)


@dataclasses.dataclass(frozen=True)
class NMBudget:
    """N:M sparsity: every M consecutive weights along a kernel's reduction axis keep N.

    The reduction axis is everything but the last axis of a flax kernel:
    ``(in, out)`` for dense, ``(kh, kw, in, out)`` flattened to ``kh*kw*in``
    for a HWIO convolution. The projection keeps the N largest ``|w|`` of
    every block (exact: blocks are disjoint).

    Args:
        n, m: keep ``n`` of every ``m`` (2:4, 4:8).
        layers: the kernel names to constrain (default: every kernel, i.e.
            every leaf with two or more axes; :meth:`check` names a kernel
            whose reduction size M does not divide, to leave out here).
    """

    n: int = 2
    m: int = 4
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.n <= self.m:
            raise BudgetError(f"N:M needs 0 < N <= M, got {self.n}:{self.m}.")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def _leaves(self, params: PyTree) -> list[bool]:
        names = leaf_names(params)
        if self.layers is not None:
            return [n in self.layers for n in names]
        return [np.ndim(x) >= 2 for x in jax.tree.leaves(params)]

    def prunable(self, params: PyTree) -> list[bool]:
        return self._leaves(params)

    def project(self, params: PyTree) -> Projection:
        from admmprune.projections import nm_mask

        leaves, treedef = jax.tree.flatten(params)
        out = []
        for x, f in zip(leaves, self._leaves(params), strict=True):
            if not f:
                out.append(jnp.ones(np.shape(x), bool))
                continue
            shape = np.shape(x)
            scores = jnp.abs(jnp.asarray(x)).reshape(-1, shape[-1])
            out.append(nm_mask(scores, self.n, self.m).reshape(shape))
        return Projection(jax.tree.unflatten(treedef, out), {})

    def measure(self, params: PyTree) -> dict[str, float]:
        return {}

    def check(self, params: PyTree) -> None:
        names = leaf_names(params)
        if self.layers is not None:
            missing = sorted(set(self.layers) - set(names))
            if missing:
                raise BudgetError(f"N:M layers {missing} are not leaves; leaves are {names}.")
        for name, x, f in zip(names, jax.tree.leaves(params), self._leaves(params), strict=True):
            if not f:
                continue
            k = int(np.prod(np.shape(x)[:-1]))
            if np.ndim(x) < 2 or k % self.m:
                raise BudgetError(
                    f"{name}: its reduction size {k} is not a multiple of M={self.m}, so "
                    f"{self.n}:{self.m} blocks do not tile it; leave it out with layers= or "
                    "choose an M that divides it."
                )

    def relax(self, t: float) -> NMBudget:
        return self

    def pricing(self, params: PyTree) -> Pricing:
        raise BudgetError(
            "an N:M budget fixes the kept count of every block; it has no total to divide "
            'among layers (use method = "refit" or an OBS pruner with N:M).'
        )

    def describe(self) -> dict[str, Any]:
        return {"type": "n:m", "n": self.n, "m": self.m, "layers": list(self.layers or ())}


__all__ = [
    "ChannelBudget",
    "ChannelEnergyBudget",
    "MacsBudget",
    "NMBudget",
    "StructuredBudget",
    "energy_structure",
    "fit_channel_energy",
]
