"""Budgets: what a pruned network is allowed to keep -- the one seam every solver uses.

A budget is a frozen description of the set S in ``minimize L(W) s.t. W in S``.
Every solver, baseline, one-shot pruner, recipe and report goes through the
:class:`Budget` protocol below and nothing else: no module outside a
budget's own file asks which kind of budget it holds.

* :meth:`Budget.project` -- the Euclidean projection onto S: the support
  (every sparsity projection keeps a subset of entries and zeros the rest)
  and its figures (e.g. the energy of the projected point, a knapsack's gap);
* :meth:`Budget.measure` -- the same figures for any network;
* :meth:`Budget.check` -- that the budget can be met by ``params``, else a
  :class:`BudgetError` naming what would be feasible;
* :meth:`Budget.relax` -- the budget a fraction of the way from dense;
* :meth:`Budget.pricing` -- what a per-layer allocation needs: the budget's
  cost of keeping ``k`` weights of a layer, and the capacity;
* :meth:`Budget.prunable`, :meth:`Budget.describe`.

A new budget is any class with these methods (see ``tests/test_budgets.py``
for one defined outside the library); recipes reach it by import path,
``[budget] type = "mypkg.budgets:RowTopK"``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np

from admmprune._tree import (
    PrunableFilter,
    PyTree,
    apply_masks,
    leaf_names,
    path_name,
    prunable_flags,
)
from admmprune.projections import topk_masks


class BudgetError(ValueError):
    """A budget that no pruned network can meet, or that names nothing."""


class Projection(NamedTuple):
    """What :meth:`Budget.project` returns.

    Attributes:
        masks: boolean pytree like the params, True where the projection
            keeps an entry (all True on leaves the budget does not prune).
        figures: the budget's figures for the projected point (e.g.
            ``energy``, ``energy_fraction``, a knapsack's ``projection_gap``);
            empty when the budget has none.
    """

    masks: PyTree
    figures: dict[str, float]


class Pricing(NamedTuple):
    """How a budget prices per-layer kept counts, for a layer allocation.

    Attributes:
        cost: ``cost(layer_name, kept_count)``, nondecreasing in the count.
        capacity: the largest summed cost the budget allows.
        per_weight: True when ``cost(name, k) == k`` for every layer (the
            budget counts weights, so ``capacity`` is a kept-weight count).
    """

    cost: Callable[[str, float], float]
    capacity: float
    per_weight: bool


@runtime_checkable
class Budget(Protocol):
    """The budget protocol: everything a solver, recipe or report asks of a budget."""

    def prunable(self, params: PyTree) -> list[bool]:
        """Which leaves (in ``jax.tree.leaves`` order) the budget may prune."""
        ...

    def project(self, params: PyTree) -> Projection:
        """The Euclidean projection of ``params`` onto S: its support and figures.

        ``Proj_S(V) = argmin_{Z in S} ||Z - V||^2``; the projected point is
        ``apply_masks(params, masks)``.
        """
        ...

    def measure(self, params: PyTree) -> dict[str, float]:
        """The budget's figures for the nonzero pattern of ``params`` ({} if none)."""
        ...

    def check(self, params: PyTree) -> None:
        """Raises :class:`BudgetError` unless a network shaped like ``params`` can
        meet the budget; the message names the feasible range."""
        ...

    def relax(self, t: float) -> Budget:
        """The budget a fraction ``t`` of the way from dense (0) to this one (1)."""
        ...

    def pricing(self, params: PyTree) -> Pricing:
        """The cost of per-layer kept counts and the capacity, for an allocation.

        Raises:
            BudgetError: when the budget is not one total that layers can share.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description, for reports."""
        ...


def in_budget(params: PyTree, budget: Budget) -> bool:
    """Whether ``params`` lies in the budget set: its projection leaves it unchanged.

    Exact for an exact projection (a point of S is its own projection); for an
    approximate one (the greedy knapsack) a True answer is still a proof.
    """
    projected = apply_masks(params, budget.project(params).masks)
    return all(
        bool(np.array_equal(np.asarray(a), np.asarray(b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(projected), strict=True)
    )


@dataclasses.dataclass(frozen=True)
class ResolvedGroup:
    """One top-k problem: keep ``k`` entries over the listed leaves jointly."""

    leaves: tuple[int, ...]
    k: int


def _largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Splits ``total`` in proportion to ``sizes``, summing exactly to ``total``.

    Hamilton's method: floor every share, then hand the remaining units to the
    largest fractional parts (ties to the earlier layer). No share exceeds its
    size because ``total <= sum(sizes)``.
    """
    n = sum(sizes)
    if n == 0:
        return [0] * len(sizes)
    exact = [total * s / n for s in sizes]
    shares = [min(math.floor(e), s) for e, s in zip(exact, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    left = total - sum(shares)
    for i in order:
        if left == 0:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
            left -= 1
    return shares


@dataclasses.dataclass(frozen=True)
class ParamBudget:
    """A parameter budget: at most ``k`` nonzero prunable weights.

    Say how much with exactly one of

    * ``keep``: the fraction of prunable weights kept, in [0, 1]
      (``k = round(keep * N)``);
    * ``count``: the number of prunable weights kept, in [0, N];
    * ``per_layer``: a map from layer name to a kept fraction (float) or count
      (int). A key names a leaf (``"fc1/kernel"``) or a prefix of leaf names
      (``"fc1"``); every key must match at least one prunable leaf. Prunable
      leaves that no key names are kept dense.

    and where with ``allocation``:

    * ``"global"`` (default): one top-k over all prunable weights jointly,
      ``S = {W : ||W||_0 <= k}``;
    * ``"uniform"``: the same kept fraction in every prunable leaf,
      ``S = {W : ||W_l||_0 <= k_l}``, with ``k_l`` proportional to the leaf's
      size and summing exactly to ``k`` (largest-remainder rounding).

    ``prunable(name, leaf) -> bool`` chooses which leaves may be pruned; by
    default kernels and weight matrices (two or more dimensions), not biases
    or norm parameters.

    The projection onto S is top-k by magnitude per group (Zhang et al., ECCV
    2018, section 3); see :func:`admmprune.projections.topk_masks`.

    Examples:
        >>> ParamBudget(keep=0.02)                      # 2% kept, globally
        >>> ParamBudget(count=5324, allocation="uniform")
        >>> ParamBudget(per_layer={"fc1": 0.08, "fc2": 0.09, "fc3": 0.26})
    """

    keep: float | None = None
    count: int | None = None
    per_layer: Mapping[str, float | int] | tuple[tuple[str, float | int], ...] | None = None
    allocation: Literal["global", "uniform"] = "global"
    prunable_filter: PrunableFilter | None = dataclasses.field(default=None, compare=False)
    progress: float = 1.0

    def __post_init__(self) -> None:
        given = [n for n in ("keep", "count", "per_layer") if getattr(self, n) is not None]
        if len(given) != 1:
            raise BudgetError(
                "ParamBudget takes exactly one of keep=, count= or per_layer= "
                f"(got {', '.join(given) or 'none'}); e.g. ParamBudget(keep=0.02)."
            )
        if self.keep is not None:
            _check_fraction("keep", self.keep)
            if self.keep == 0:
                raise BudgetError(
                    "keep=0 is an empty budget: every weight would be pruned; keep a positive "
                    "fraction (the smallest non-empty budget is count=1)."
                )
        if self.count is not None:
            if isinstance(self.count, bool) or not isinstance(self.count, int | np.integer):
                raise BudgetError(f"count must be an integer, got {self.count!r}.")
            if self.count < 0:
                raise BudgetError(f"count must be >= 0, got {self.count}.")
            if self.count == 0:
                raise BudgetError(
                    f"count={self.count} is an empty budget: every weight would be pruned; "
                    "the smallest non-empty budget is count=1."
                )
        if self.allocation not in ("global", "uniform"):
            raise BudgetError(f"allocation must be 'global' or 'uniform', got {self.allocation!r}.")
        if self.per_layer is not None:
            if not self.per_layer:
                raise BudgetError("per_layer is empty; name at least one layer.")
            for name, v in dict(self.per_layer).items():
                if isinstance(v, bool) or not isinstance(v, int | float | np.number):
                    raise BudgetError(f"per_layer[{name!r}] must be a number, got {v!r}.")
                if _is_fraction(v):
                    _check_fraction(f"per_layer[{name!r}]", v)
                elif v < 0:
                    raise BudgetError(f"per_layer[{name!r}] must be >= 0, got {v}.")
            if self.allocation != "global":
                raise BudgetError(
                    "allocation applies to keep= and count=; per_layer= already says where."
                )
            # Frozen and hashable: keep the map as a sorted tuple of (name, value) pairs.
            items = (
                (str(k), float(v) if _is_fraction(v) else int(v))
                for k, v in dict(self.per_layer).items()
            )
            object.__setattr__(self, "per_layer", tuple(sorted(items)))

    @property
    def is_global(self) -> bool:
        """Whether this is one top-k over all prunable leaves (``keep=``/``count=``,
        ``allocation="global"``), the budget a layer allocation may divide."""
        return self.per_layer is None and self.allocation == "global"

    # ------------------------------------------------------------------ resolve
    def prunable(self, params: PyTree) -> list[bool]:
        """Which leaves (in ``jax.tree.leaves`` order) this budget may prune.

        With ``per_layer``, only the leaves its keys name: the others are not
        in the budget set's constraints at all (ADMM does not penalize them).
        """
        flags = prunable_flags(params, self.prunable_filter)
        if self.per_layer is None:
            return flags
        names = leaf_names(params)
        return [
            f and any(n == k or n.startswith(k + "/") for k, _ in self.per_layer)
            for n, f in zip(names, flags, strict=True)
        ]

    def resolve(self, params: PyTree) -> tuple[ResolvedGroup, ...]:
        """The top-k groups this budget means for ``params`` (shapes only).

        Raises:
            BudgetError: when the budget exceeds the prunable weights, or a
                ``per_layer`` key matches no prunable leaf.
        """
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        names = [path_name(p) for p, _ in flat]
        sizes = [int(np.prod(np.shape(leaf))) for _, leaf in flat]
        flags = prunable_flags(params, self.prunable_filter)
        idx = [i for i, f in enumerate(flags) if f]
        total = sum(sizes[i] for i in idx)
        if not idx:
            raise BudgetError(
                "no prunable leaves: the filter selected none of "
                f"{names[:8]}{'...' if len(names) > 8 else ''}; pass prunable_filter=."
            )
        if self.per_layer is not None:
            return self._resolve_per_layer(names, sizes, idx)
        k = self.count if self.count is not None else round(self.keep * total)
        if k == 0:
            raise BudgetError(
                f"keep={self.keep} rounds to 0 of the {total} prunable weights, an empty "
                f"budget; the smallest non-empty budget is keep={1 / total:.3g} (count=1)."
            )
        if k > total:
            raise BudgetError(
                f"count={k} exceeds the {total} prunable weights; "
                f"use a count in [0, {total}] or keep= in [0, 1]."
            )
        k = _relaxed(int(k), total, self.progress)
        if self.allocation == "global":
            return (ResolvedGroup(tuple(idx), k),)
        shares = _largest_remainder(int(k), [sizes[i] for i in idx])
        return tuple(ResolvedGroup((i,), s) for i, s in zip(idx, shares, strict=True))

    def _resolve_per_layer(
        self, names: list[str], sizes: list[int], idx: list[int]
    ) -> tuple[ResolvedGroup, ...]:
        groups: dict[int, ResolvedGroup] = {}
        for key, v in self.per_layer:
            hits = [i for i in idx if names[i] == key or names[i].startswith(key + "/")]
            if not hits:
                prunable_names = [names[i] for i in idx]
                raise BudgetError(
                    f"per_layer key {key!r} matches no prunable leaf; "
                    f"prunable leaves are {prunable_names}."
                )
            n = sum(sizes[i] for i in hits)
            k = round(v * n) if _is_fraction(v) else int(v)
            if k > n:
                raise BudgetError(
                    f"per_layer[{key!r}]={v} keeps more than the {n} weights of "
                    f"{[names[i] for i in hits]}; use at most {n}."
                )
            shares = _largest_remainder(_relaxed(k, n, self.progress), [sizes[i] for i in hits])
            for i, s in zip(hits, shares, strict=True):
                if i in groups:
                    raise BudgetError(f"leaf {names[i]!r} is named by more than one per_layer key.")
                groups[i] = ResolvedGroup((i,), s)
        if not any(g.k for g in groups.values()):
            raise BudgetError(
                "per_layer keeps no weight in any layer, an empty budget; keep at least one."
            )
        return tuple(groups[i] for i in sorted(groups))

    # ------------------------------------------------------------------ project
    def mask(self, params: PyTree) -> PyTree:
        """The support of the Euclidean projection of ``params`` onto S.

        Pure and traceable (the resolution uses shapes only); leaves that are
        not pruned get an all-True mask.
        """
        return topk_masks(params, self.resolve(params))

    def project(self, params: PyTree) -> Projection:
        """The top-k projection's support; a parameter budget has no figures."""
        return Projection(self.mask(params), {})

    def measure(self, params: PyTree) -> dict[str, float]:
        """No figures beyond the weight counts every report has."""
        del params
        return {}

    def check(self, params: PyTree) -> None:
        """Resolves the budget against ``params`` (see :meth:`resolve` for the errors)."""
        self.resolve(params)

    def pricing(self, params: PyTree) -> Pricing:
        """One weight costs one; the capacity is the global kept count.

        Raises:
            BudgetError: for a per-layer or uniform budget, which already says
                where the weights go.
        """
        if not self.is_global:
            raise BudgetError(
                "allocation='obs' divides one global budget among the layers; give "
                "ParamBudget(keep=...) or (count=...) with allocation='global'."
            )
        k = sum(g.k for g in self.resolve(params))
        return Pricing(lambda _name, count: count, float(k), per_weight=True)

    def relax(self, t: float) -> ParamBudget:
        """The budget a fraction ``t`` of the way from dense (0) to this (1).

        Every group's kept fraction interpolates geometrically,
        ``f_t = f ** t`` (so ``k_t = round(n * (k / n) ** t)``), the schedule of
        iterative magnitude pruning (Han et al., NeurIPS 2015).
        """
        _check_fraction("t", t)
        return dataclasses.replace(self, progress=float(t))

    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the budget, for reports."""
        out: dict[str, Any] = {"type": "param", "allocation": self.allocation}
        for name in ("keep", "count"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.per_layer is not None:
            out["per_layer"] = dict(self.per_layer)
        return out


@dataclasses.dataclass(frozen=True)
class LayerAllocation:
    """A budget S narrowed to fixed per-layer kept counts chosen inside it.

    The set ``{W : ||W_l||_0 <= k_l for every layer l}`` lies inside S when
    the counts were chosen to fit S (e.g. by :func:`admmprune.oneshot.allocate`
    over the layers' OBS loss curves, each count priced by the budget's own
    energy model), so every point of it meets the budget; its Euclidean
    projection is exact (top-k within each layer). Prunable leaves, energy
    figures and the report's description come from ``parent``; the
    description adds ``allocation`` (the counts).

    Example:
        >>> LayerAllocation(EnergyBudget(model, fraction=0.08),
        ...                 (("conv1/kernel", 264), ("fc1/kernel", 5700)))
    """

    parent: Budget
    counts: tuple[tuple[str, int], ...]
    progress: float = 1.0

    def _inner(self) -> ParamBudget:
        named = {n for n, _ in self.counts}
        return ParamBudget(
            per_layer=self.counts,
            progress=self.progress,
            prunable_filter=lambda name, _leaf: name in named,  # exactly the counted leaves
        )

    def prunable(self, params: PyTree) -> list[bool]:
        return self.parent.prunable(params)

    def mask(self, params: PyTree) -> PyTree:
        """Top ``k_l`` magnitudes in every named layer; other leaves all True."""
        return self._inner().mask(params)

    def project(self, params: PyTree) -> Projection:
        """Top ``k_l`` in every named layer, with the parent's figures for the result."""
        masks = self.mask(params)
        return Projection(masks, self.parent.measure(apply_masks(params, masks)))

    def measure(self, params: PyTree) -> dict[str, float]:
        """The parent's figures for ``params`` (e.g. energy)."""
        return self.parent.measure(params)

    def check(self, params: PyTree) -> None:
        """The parent is feasible and every count names a leaf and fits it."""
        self.parent.check(params)
        self._inner().check(params)

    def pricing(self, params: PyTree) -> Pricing:
        """The parent's pricing (the counts were chosen inside it)."""
        return self.parent.pricing(params)

    def relax(self, t: float) -> LayerAllocation:
        """Every layer's count moved geometrically from dense (0) to ``k_l`` (1)."""
        return dataclasses.replace(self, progress=float(t))

    def describe(self) -> dict[str, Any]:
        return {**self.parent.describe(), "allocation": dict(self.counts)}


def _is_fraction(v: Any) -> bool:
    return isinstance(v, float | np.floating)


def _relaxed(k: int, n: int, t: float) -> int:
    """``round(n * (k / n) ** t)``: dense at t = 0, exactly ``k`` at t = 1."""
    if t == 1.0 or n == 0:
        return k
    if k == 0:
        return n if t == 0.0 else 0
    return min(n, max(k, round(n * (k / n) ** t)))


def _check_fraction(name: str, v: float) -> None:
    if not (isinstance(v, int | float | np.number) and 0.0 <= float(v) <= 1.0):
        raise BudgetError(f"{name} must be a fraction in [0, 1], got {v!r}.")
