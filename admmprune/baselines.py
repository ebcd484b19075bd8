"""Magnitude-pruning baselines in the same API as :class:`admmprune.ADMM`.

For an honest comparison at equal epochs: give every method the same total
training-epoch budget (``.epochs``) and the same optimizer.

References:
    S. Han, J. Pool, J. Tran, W. Dally, "Learning both Weights and Connections
    for Efficient Neural Networks", NeurIPS 2015.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import optax

from admmprune._tree import PyTree, apply_masks
from admmprune.admm import Callback, EvalFn
from admmprune.budgets import Budget
from admmprune.results import PruneResult, finish, with_eval
from admmprune.training import LossFn, check_batch_size, train


@dataclasses.dataclass(frozen=True)
class MagnitudePrune:
    """One-shot magnitude pruning, then masked retraining.

    The mask is that of the Euclidean projection onto the budget set
    (top-k by |w|), computed once from the trained weights.
    """

    budget: Budget
    optimizer: optax.GradientTransformation
    retrain_epochs: int = 5
    batch_size: int = 128

    @property
    def epochs(self) -> int:
        return self.retrain_epochs

    def run(
        self,
        params: PyTree,
        loss_fn: LossFn,
        data: PyTree,
        *,
        key: jax.Array,
        eval_fn: EvalFn | None = None,
        callback: Callback | None = None,
    ) -> PruneResult:
        """Prunes ``params`` to the budget in one shot and retrains with the mask fixed."""
        start = time.perf_counter()
        check_batch_size(data, self.batch_size)
        masks = self.budget.mask(params)
        pruned = apply_masks(params, masks)
        history = [with_eval({"phase": "prune", "round": 1}, pruned, eval_fn)]
        if callback is not None:
            callback(history[-1])
        pruned, retrain = train(
            pruned,
            loss_fn,
            data,
            optimizer=self.optimizer,
            epochs=self.retrain_epochs,
            batch_size=self.batch_size,
            key=key,
            masks=masks,
            eval_fn=eval_fn,
            callback=callback,
            phase="retrain",
        )
        history += retrain
        return finish(
            params=pruned,
            masks=masks,
            budget=self.budget,
            history=history,
            method="magnitude",
            start=start,
            epochs=self.epochs,
        )


@dataclasses.dataclass(frozen=True)
class IterativeMagnitudePrune:
    """Iterative magnitude pruning (Han et al., 2015): prune a little, retrain, repeat.

    Round ``r`` of ``rounds`` prunes to ``budget.relax(r / rounds)`` -- kept
    fractions shrink geometrically to the target -- among the weights still
    alive, then retrains ``epochs_per_round`` epochs with the mask fixed.
    """

    budget: Budget
    optimizer: optax.GradientTransformation
    rounds: int = 5
    epochs_per_round: int = 2
    batch_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}.")

    @property
    def epochs(self) -> int:
        return self.rounds * self.epochs_per_round

    def run(
        self,
        params: PyTree,
        loss_fn: LossFn,
        data: PyTree,
        *,
        key: jax.Array,
        eval_fn: EvalFn | None = None,
        callback: Callback | None = None,
    ) -> PruneResult:
        """Runs ``rounds`` prune/retrain rounds ending exactly at the budget."""
        start = time.perf_counter()
        check_batch_size(data, self.batch_size)
        history: list[dict[str, Any]] = []
        masks = None
        for r in range(1, self.rounds + 1):
            # Pruned weights are exactly zero, so a smaller top-k never revives them.
            masks = self.budget.relax(r / self.rounds).mask(params)
            params = apply_masks(params, masks)
            history.append(with_eval({"phase": "prune", "round": r}, params, eval_fn))
            if callback is not None:
                callback(history[-1])
            key, sub = jax.random.split(key)
            params, retrain = train(
                params,
                loss_fn,
                data,
                optimizer=self.optimizer,
                epochs=self.epochs_per_round,
                batch_size=self.batch_size,
                key=sub,
                masks=masks,
                eval_fn=eval_fn,
                callback=callback,
                phase="retrain",
            )
            for rec in retrain:
                rec["round"] = r
            history += retrain
        return finish(
            params=params,
            masks=masks,
            budget=self.budget,
            history=history,
            method="iterative_magnitude",
            start=start,
            epochs=self.epochs,
        )
