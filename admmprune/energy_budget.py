"""The energy budget: ``S = {W : E(W) <= B}`` for a layer-wise energy model.

Its projection is a knapsack over per-weight costs (:mod:`admmprune.knapsack`):
the greedy value/cost ratio with an LP bound, jit-compiled, or an exact MILP.

References:
    H. Yang, Y. Zhu, J. Liu, "Energy-Constrained Compression for Deep Neural
    Networks via Weighted Sparse Projection and Layer Input Masking", ICLR 2019.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, apply_masks, leaf_names, scatter_flat
from admmprune.budgets import BudgetError, Pricing, Projection
from admmprune.energy import LayerwiseEnergy
from admmprune.knapsack import KnapsackStats, exact_knapsack, greedy_core


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
    return scatter_flat(flat, [i for i, *_ in specs], leaves), tuple(stats)


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
        masks_np = scatter_flat(np.asarray(flat), [i for i, *_ in specs], leaves)
        return jax.tree.unflatten(treedef, [jnp.asarray(m) for m in masks_np]), stats

    def mask(self, params: PyTree) -> PyTree:
        """The support of the (greedy or exact) projection of ``params`` onto S."""
        return self.project_with_stats(params)[0]

    def project(self, params: PyTree) -> Projection:
        """The knapsack projection's support, with the projected point's energy
        (``energy``, ``energy_fraction``) and the knapsack's relative gap bound
        (``projection_gap``)."""
        masks, stats = self.project_with_stats(params)
        figures = {"projection_gap": stats.relative_gap}
        figures.update(self.measure(apply_masks(params, masks)))
        return Projection(masks, figures)

    def check(self, params: PyTree) -> None:
        """The model costs leaves of ``params`` of the right sizes (the floor was
        checked when the budget was made)."""
        self._specs(params)

    def pricing(self, params: PyTree) -> Pricing:
        """Each layer's energy at a kept count, and the budget less what no
        pruning removes.

        Raises:
            BudgetError: when the model costs a leaf that ``params`` lacks.
        """
        names = leaf_names(params)
        flags = self.prunable(params)
        layer = {c.name: c for c in self.model.costs()}
        prunable = {n for n, f in zip(names, flags, strict=True) if f}
        fixed = sum(c.energy(c.size) for n, c in layer.items() if n not in prunable)  # kept dense
        missing = sorted(prunable - set(layer))
        if missing:
            raise BudgetError(f"the energy model does not cost {missing}.")
        capacity = self.limit() - self.model.constant - fixed
        return Pricing(lambda n, c: layer[n].energy(c), capacity, per_weight=False)

    def relax(self, t: float) -> EnergyBudget:
        """The budget a fraction ``t`` of the way from dense (0) to this one (1).

        The budget interpolates geometrically, ``B_t = dense (B / dense) ** t``.
        """
        if not 0.0 <= t <= 1.0:
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

    def measure(self, params: PyTree) -> dict[str, float]:
        """Energy of the nonzero pattern of ``params``, absolute and as a fraction of dense."""
        e = self.model.energy(params)
        return {"energy": e, "energy_fraction": e / self.model.dense()}


__all__ = ["EnergyBudget"]
