"""One-shot pruning of a trained network with calibration data, and per-layer allocation.

:class:`OneShotPrune` takes trained parameters, a few thousand calibration
examples and a parameter or energy budget, and returns the pruned network
without retraining (optionally followed by masked retraining), in the same
``run`` API as :class:`admmprune.ADMM`.

Per-layer allocation (``allocation="obs"``): every prunable layer's loss
curve -- its relative reconstruction error ``e_l(k)`` after OBS at ``k``
kept weights, on a grid of ``k`` -- is computed once, and the per-layer
counts minimize the summed error under the global budget:

    minimize sum_l e_l(k_l)   subject to   sum_l cost_l(k_l) <= B,

``cost_l(k) = k`` for a parameter budget, the layer's energy for an energy
budget. We solve it exactly on the grid as a multiple-choice knapsack MILP
(HiGHS through cvxpy: a binary per layer and grid point, one point per
layer) rather than over a convex fit, because the curves are not convex
near zero kept weights (a layer's error saturates at 1), which a convex fit
would misstate exactly where high sparsity puts the answer; a dynamic
program would do the same job but needs the energy costs discretized. The
budget the grid leaves unused is then handed out along the curves' slopes
(linear interpolation between grid points), so the counts meet the budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admmprune import obs
from admmprune._tree import PyTree, leaf_names
from admmprune.budgets import Budget, BudgetError, LayerAllocation, in_budget
from admmprune.finetune import Finetune
from admmprune.guards import check_inputs, check_model_params, check_params
from admmprune.knapsack import quiet_native_stdout
from admmprune.results import PruneResult, finish
from admmprune.training import Callback, EvalFn, LossFn

ONE_SHOT_METHODS = (*obs.METHODS, "global_obs")

if TYPE_CHECKING:
    from admmprune.checkpoint import RunCheckpoint


def allocate(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    cost: Callable[[str, float], float],
    capacity: float,
) -> dict[str, int]:
    """Per-layer kept counts minimizing the summed curve values under a budget.

    Args:
        curves: layer name -> ``(counts, errors)``, counts increasing and
            including 0, errors the layer's loss at each count.
        cost: ``cost(name, count)``, nondecreasing in ``count``.
        capacity: the budget on the summed cost.

    Raises:
        BudgetError: when even zero weights everywhere exceed ``capacity``.
    """
    import cvxpy as cp

    names = list(curves)
    costs = [np.array([cost(n, float(k)) for k in curves[n][0]]) for n in names]
    floor = sum(float(c[0]) for c in costs)
    if floor > capacity * (1 + 1e-12):
        raise BudgetError(
            f"the budget {capacity:.6g} is below the cost with every prunable weight "
            f"removed; raise it to at least {floor:.6g}."
        )
    choose = [cp.Variable(len(curves[n][0]), boolean=True) for n in names]
    objective = sum(x @ curves[n][1] for x, n in zip(choose, names, strict=True))
    constraints = [cp.sum(x) == 1 for x in choose]
    constraints.append(sum(x @ c for x, c in zip(choose, costs, strict=True)) <= capacity)
    problem = cp.Problem(cp.Minimize(objective), constraints)
    with quiet_native_stdout():
        problem.solve(solver=cp.HIGHS)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"the allocation MILP ended {problem.status}.")
    at = [int(np.argmax(x.value)) for x in choose]
    counts = {n: float(curves[n][0][i]) for n, i in zip(names, at, strict=True)}
    # Hand out what the grid left, steepest error decrease per unit cost first.
    left = capacity - sum(costs[j][i] for j, i in enumerate(at))
    while left > 0:
        best, slope = None, 0.0
        for j, n in enumerate(names):
            ks, es = curves[n]
            i = at[j]
            if i + 1 < len(ks):
                dc = costs[j][i + 1] - costs[j][i]
                s = (es[i] - es[i + 1]) / dc if dc > 0 else np.inf
                if s > slope:
                    best, slope = j, s
        if best is None:
            break
        n = names[best]
        ks = curves[n][0]
        i = at[best]
        dc = costs[best][i + 1] - costs[best][i]
        if dc <= left:
            counts[n] = float(ks[i + 1])
            at[best] = i + 1
            left -= dc
        else:
            # Partway to the next grid point: the largest count whose cost fits.
            lo, hi = int(ks[i]), int(ks[i + 1])
            budget_here = costs[best][i] + left
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if cost(n, float(mid)) <= budget_here else (lo, mid)
            counts[n] = float(lo)
            break
    return {n: round(k) for n, k in counts.items()}


def obs_allocation(
    budget: Budget,
    model: Any,
    x: jax.Array,
    *,
    method: str = "exact_obs",
    damp: float = 0.01,
    block: int = 128,
    curve_points: int = 40,
) -> Callable[[PyTree], LayerAllocation]:
    """``allocate(params)``: ``budget`` narrowed to per-layer counts from OBS loss curves.

    For ADMM, narrow the budget once from the dense params,
    ``ADMM(budget=obs_allocation(...)(params), ...)``: the counts minimize the
    summed relative OBS reconstruction error of the layers at ``params``
    (the dense network) on the calibration inputs ``x`` under the budget
    (:func:`allocate`; energy budgets price each count in their own model),
    and ADMM's Z-step then projects onto those counts. Where the Euclidean
    energy knapsack ranks weights by ``v^2 / c`` across layers -- and so
    starves a layer whose weights are few, costly and sensitive -- the
    curves measure what each layer's cut does to its output.
    """
    pruner = OneShotPrune(
        budget=budget,
        model=model,
        method=method,
        allocation="obs",
        calibration_examples=int(x.shape[0]),
        damp=damp,
        block=block,
        curve_points=curve_points,
    )

    def allocate_counts(params: PyTree) -> LayerAllocation:
        check_params(params)
        check_model_params(model, params, "obs_allocation")
        counts = pruner.counts(params, x)
        return LayerAllocation(budget, tuple(sorted((n, int(k)) for n, k in counts.items())))

    return allocate_counts


def count_grid(size: int, points: int = 40, smallest: float = 1e-3) -> np.ndarray:
    """0, then ``points`` kept counts geometric from ``smallest * size`` to ``size``."""
    g = np.unique(np.round(np.geomspace(max(1.0, smallest * size), size, points)).astype(int))
    return np.concatenate([[0], g])


def layer_curve(
    method: str,
    w: jax.Array,
    h: np.ndarray,
    counts: np.ndarray,
    *,
    damp: float = 0.01,
    block: int = 128,
) -> np.ndarray:
    """Relative reconstruction error of ``method`` at each kept count.

    For exact OBS, read off the OBC removal curves in one pass (the error
    after removing a prefix is twice the summed OBS losses); for the other
    methods, one run per count.
    """
    if method == "exact_obs":
        _, loss = obs.obc_curves(w, h, damp=damp)
        mono = np.sort(np.maximum.accumulate(loss, axis=1).ravel())
        total = float(np.sum((np.asarray(w, np.float64) @ np.asarray(h)) * np.asarray(w)))
        removed = np.concatenate([[0.0], np.cumsum(mono)])
        return np.array([2 * removed[w.size - int(k)] / total for k in counts])
    out = []
    for k in counts:
        w_new, _ = obs.prune_matrix(method, w, h, int(k), damp=damp, block=block)
        out.append(obs.reconstruction_error(w, w_new, h))
    return np.asarray(out)


@dataclasses.dataclass(frozen=True)
class OneShotPrune:
    """One-shot pruning with second-order compensation, no retraining needed.

    Args:
        budget: any :class:`admmprune.Budget`. ``"refit"`` keeps the budget's
            own projection (its exact support, whatever the set) and refits
            the kept weights; the other layer-wise methods choose their own
            masks at the per-layer counts of that projection, so the result
            is checked to lie in the budget set (a budget that is more than
            per-layer counts, e.g. N:M or per-row, needs ``"refit"``).
        model: the ``nnx.Module`` whose parameters are pruned (its structure
            gives every layer's calibration inputs).
        method: ``"exact_obs"`` (OBC), ``"fast_obs"`` (SparseGPT),
            ``"refit"`` (the budget's magnitude mask + exact OBS refit),
            ``"wanda"``, ``"magnitude"``, or ``"global_obs"`` (WoodFisher
            over all layers at once; budgets that count weights only).
        quota: fast OBS's per-block budget, ``"layer"`` (from the layer-wide
            saliency ranking) or ``"block"`` (as published); see
            :func:`admmprune.obs.fast_obs`.
        allocation: ``"budget"`` -- the per-layer counts of the budget's own
            projection (uniform, per layer, or the global magnitude/energy
            mask); ``"obs"`` -- from the layers' OBS loss curves (see
            :func:`allocate`). Ignored by ``global_obs``.
        calibration_examples: training examples used for the Hessians.
        finetune: masked retraining afterwards (none by default; give it an
            optimizer, or pass ``optimizer=``).
    """

    budget: Budget
    model: Any
    method: str = "exact_obs"
    allocation: Literal["budget", "obs"] = "budget"
    calibration_examples: int = 4096
    damp: float = 0.01
    block: int = 128
    nm: tuple[int, int] | None = None
    quota: Literal["layer", "block"] = "layer"
    sequential: bool = True
    curve_points: int = 40
    fisher_block: int = 128
    fisher_damp: float = 1e-3
    fisher_steps: int = 4
    fisher_examples: int = 1024
    finetune: Finetune = Finetune()
    optimizer: optax.GradientTransformation | None = None
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.method not in ONE_SHOT_METHODS:
            raise ValueError(f"method must be one of {ONE_SHOT_METHODS}, got {self.method!r}.")
        if self.allocation not in ("budget", "obs"):
            raise ValueError(f"allocation must be 'budget' or 'obs', got {self.allocation!r}.")
        if self.finetune.epochs and (self.finetune.optimizer or self.optimizer) is None:
            raise ValueError(
                "finetune.epochs > 0 needs Finetune(optimizer=...) or optimizer= to retrain."
            )
        if self.calibration_examples < 1:
            raise ValueError("calibration_examples must be at least 1.")

    @property
    def epochs(self) -> int:
        return self.finetune.epochs

    # ---------------------------------------------------------------- counts
    def counts(self, params: PyTree, x: jax.Array) -> dict[str, int]:
        """Kept weights per prunable kernel, by the chosen allocation."""
        names = leaf_names(params)
        flags = self.budget.prunable(params)
        if self.allocation == "budget":
            masks = jax.tree.leaves(self.budget.project(params).masks)
            return {n: int(jnp.sum(m)) for n, m, f in zip(names, masks, flags, strict=True) if f}
        leaves = jax.tree.leaves(params)
        inputs = obs.calibration_inputs(self.model, params, x)
        curves = {}
        for n, leaf, f in zip(names, leaves, flags, strict=True):
            if not f:
                continue
            grid = count_grid(leaf.size, self.curve_points)
            w = obs.kernel_rows(leaf)
            h = obs.hessian(inputs[n])
            curves[n] = (
                grid,
                layer_curve(self.method, w, h, grid, damp=self.damp, block=self.block),
            )
        pricing = self.budget.pricing(params)
        return allocate(curves, pricing.cost, pricing.capacity)

    # ------------------------------------------------------------------- run
    def run(
        self,
        params: PyTree,
        loss_fn: LossFn,
        data: PyTree,
        *,
        key: jax.Array,
        eval_fn: EvalFn | None = None,
        callback: Callback | None = None,
        checkpoint: RunCheckpoint | None = None,
    ) -> PruneResult:
        """Prunes ``params`` in one shot (then retrains with the mask fixed, if asked)."""
        start = time.perf_counter()
        check_inputs(params, data, self.budget, "OneShotPrune")
        check_model_params(self.model, params, "OneShotPrune")
        x, y = data
        n = int(x.shape[0])
        pick = jax.random.permutation(key, n)[: min(self.calibration_examples, n)]
        xc, yc = x[pick], y[pick]
        if self.method == "global_obs":
            flags = self.budget.prunable(params)
            pricing = self.budget.pricing(params)
            if not pricing.per_weight:
                raise ValueError(
                    "global_obs takes a parameter budget (one kept count over all layers); "
                    "for an energy budget use exact_obs or fast_obs with allocation='obs'."
                )
            fx = min(self.fisher_examples, int(xc.shape[0]))
            from admmprune.woodfisher import global_obs

            pruned, masks, steps = global_obs(
                loss_fn,
                params,
                flags,
                int(pricing.capacity),
                (xc[:fx], yc[:fx]),
                block=self.fisher_block,
                damp=self.fisher_damp,
                steps=self.fisher_steps,
            )
            layers = [{"step": s["step"], "kept": s["kept"]} for s in steps]
        else:
            fixed = None
            if self.method == "refit" and self.allocation == "budget":
                fixed = self.budget.project(params).masks  # the budget's own support
            pruned, masks, layers = obs.prune_layerwise(
                self.model,
                params,
                xc,
                None if fixed is not None else self.counts(params, xc),
                self.method,
                masks=fixed,
                damp=self.damp,
                block=self.block,
                nm=self.nm,
                quota=self.quota,
                sequential=self.sequential,
            )
            if fixed is None and self.allocation == "budget" and not in_budget(pruned, self.budget):
                raise BudgetError(
                    f"{self.method} chose masks at the budget's per-layer counts, but they do "
                    f"not lie in the budget set {self.budget.describe()}; use method='refit', "
                    "which keeps the budget's own projection and refits the kept weights."
                )
        record = {"phase": "prune", "round": 1, "method": self.method, "layers": layers}
        pruned, history = self.finetune.run(
            pruned,
            masks,
            loss_fn,
            data,
            key=jax.random.fold_in(key, 1),
            record=record,
            optimizer=self.optimizer,
            batch_size=self.batch_size,
            eval_fn=eval_fn,
            callback=callback,
            checkpoint=checkpoint.slot("retrain") if checkpoint is not None else None,
        )
        return finish(
            params=pruned,
            masks=masks,
            budget=self.budget,
            history=history,
            method=f"oneshot_{self.method}",
            start=start,
            epochs=self.epochs,
        )


__all__ = ["ONE_SHOT_METHODS", "OneShotPrune", "allocate", "count_grid", "layer_curve"]
