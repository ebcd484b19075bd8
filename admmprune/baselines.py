"""Baselines in the same API as :class:`admmprune.ADMM`: magnitude pruning
(one-shot and iterative) and projected SGD.

For an honest comparison at equal epochs: give every method the same total
training-epoch budget (``.epochs``) and the same optimizer.

References:
    S. Han, J. Pool, J. Tran, W. Dally, "Learning both Weights and Connections
    for Efficient Neural Networks", NeurIPS 2015.
    H. Yang, Y. Zhu, J. Liu, "Energy-Constrained Compression for Deep Neural
    Networks via Weighted Sparse Projection and Layer Input Masking", ICLR 2019.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax

from admmprune._tree import PyTree, apply_masks
from admmprune.budgets import Budget
from admmprune.finetune import Finetune
from admmprune.guards import LossWatch, check_inputs, start_loss
from admmprune.results import PruneResult, finish, with_eval
from admmprune.training import (
    Callback,
    EvalFn,
    LossFn,
    check_batch_size,
    run_steps,
    shuffled_batches,
)

if TYPE_CHECKING:
    from admmprune.checkpoint import RunCheckpoint


@dataclasses.dataclass(frozen=True)
class MagnitudePrune:
    """One-shot magnitude pruning, then masked retraining.

    The mask is that of the Euclidean projection onto the budget set
    (top-k by |w|), computed once from the trained weights; ``finetune``
    retrains with it fixed (with ``optimizer`` unless it names its own).
    """

    budget: Budget
    optimizer: optax.GradientTransformation
    finetune: Finetune = Finetune(epochs=5)
    batch_size: int = 128

    @property
    def epochs(self) -> int:
        return self.finetune.epochs

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
        """Prunes ``params`` to the budget in one shot and retrains with the mask fixed."""
        start = time.perf_counter()
        check_inputs(params, data, self.budget, "MagnitudePrune")
        check_batch_size(data, self.batch_size)
        masks = self.budget.project(params).masks
        pruned, history = self.finetune.run(
            params,
            masks,
            loss_fn,
            data,
            key=key,
            record={"phase": "prune", "round": 1},
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
        check_inputs(params, data, self.budget, "IterativeMagnitudePrune")
        check_batch_size(data, self.batch_size)
        history: list[dict[str, Any]] = []
        masks = None
        for r in range(1, self.rounds + 1):
            # Pruned weights are exactly zero, so a smaller top-k never revives them.
            masks = self.budget.relax(r / self.rounds).project(params).masks
            key, sub = jax.random.split(key)
            params, records = Finetune(epochs=self.epochs_per_round).run(
                params,
                masks,
                loss_fn,
                data,
                key=sub,
                record={"phase": "prune", "round": r},
                optimizer=self.optimizer,
                batch_size=self.batch_size,
                eval_fn=eval_fn,
                callback=callback,
            )
            for rec in records[1:]:
                rec["round"] = r
            history += records
        return finish(
            params=params,
            masks=masks,
            budget=self.budget,
            history=history,
            method="iterative_magnitude",
            start=start,
            epochs=self.epochs,
        )


@dataclasses.dataclass(frozen=True)
class ProjectedSGD:
    """Projected SGD with a decaying budget (Yang, Zhu & Liu, ICLR 2019), then retraining.

    Training steps alternate with projections: every ``project_every``
    minibatches the weights are replaced by their projection onto the budget
    relaxed to progress ``t = min(1, epochs_done / decay_epochs)`` (dense at
    t = 0, the target at t = 1; for an energy budget the knapsack
    projection, ``B_t = dense (B / dense) ** t``). After ``projected_epochs`` the
    weights are projected onto the target and retrained with that mask fixed
    for ``retrain_epochs``. Pruned weights may grow back between projections
    until the mask is frozen, as in the published method.

    The paper trains with SGD (lr 1e-3, momentum 0.9), projects every 10
    batches and decays the budget over 30 epochs.

    Args:
        budget: the target budget (any :class:`admmprune.Budget`).
        optimizer: the training optimizer.
        projected_epochs: projected-training epochs.
        project_every: minibatches between projections.
        decay_epochs: epochs over which the budget decays to the target
            (default: ``projected_epochs``).
        finetune: the final hard prune and masked retraining (none by
            default; its optimizer defaults to ``optimizer``).
        batch_size: minibatch size.

    References:
        H. Yang, Y. Zhu, J. Liu, "Energy-Constrained Compression for Deep
        Neural Networks via Weighted Sparse Projection and Layer Input
        Masking", ICLR 2019.
    """

    budget: Budget
    optimizer: optax.GradientTransformation
    projected_epochs: int = 30
    project_every: int = 10
    decay_epochs: int | None = None
    finetune: Finetune = Finetune()
    batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("projected_epochs",):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")
        if not isinstance(self.project_every, int) or self.project_every < 1:
            raise ValueError(
                f"project_every must be a positive integer, got {self.project_every!r}."
            )
        if self.decay_epochs is not None and (
            not isinstance(self.decay_epochs, int) or self.decay_epochs < 1
        ):
            raise ValueError(f"decay_epochs must be a positive integer, got {self.decay_epochs!r}.")

    @property
    def epochs(self) -> int:
        """Training epochs in all: projected plus retraining."""
        return self.projected_epochs + self.finetune.epochs

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
        """Projected training, the final projection, then masked retraining."""
        start = time.perf_counter()
        check_inputs(params, data, self.budget, "ProjectedSGD")
        steps = check_batch_size(data, self.batch_size)
        decay = self.decay_epochs or max(self.projected_epochs, 1)
        # The dense start's loss (at least guards.LOSS_FLOOR): projecting once more here
        # would be one more call than the run's own projections make.
        reference = start_loss(loss_fn, params, data, self.batch_size)
        watch = LossWatch("projected SGD", reference, self.finetune.divergence_factor)
        train_key, retrain_key = jax.random.split(key)
        opt_state = self.optimizer.init(params)
        history: list[dict[str, Any]] = []

        def emit(record: dict[str, Any]) -> None:
            history.append(record)
            if callback is not None:
                callback(record)

        for epoch in range(self.projected_epochs):
            train_key, sub = jax.random.split(train_key)
            batches = shuffled_batches(data, sub, self.batch_size)
            tick = time.perf_counter()
            losses = []
            t = 0.0
            for first in range(0, steps, self.project_every):
                last = min(first + self.project_every, steps)
                params, opt_state, loss = run_steps(
                    params,
                    opt_state,
                    data,
                    batches[first:last],
                    loss_fn=loss_fn,
                    optimizer=self.optimizer,
                )
                t = min(1.0, (epoch + last / steps) / decay)
                params = apply_masks(params, self.budget.relax(t).project(params).masks)
                losses.append(loss)
            record: dict[str, Any] = {
                "phase": "projected",
                "epoch": epoch + 1,
                "loss": watch(float(jnp.mean(jnp.concatenate(losses))), f"epoch {epoch + 1}"),
                "progress": t,
                "seconds": time.perf_counter() - tick,
            }
            record.update(self.budget.measure(params))
            emit(with_eval(record, params, eval_fn))

        masks = self.budget.project(params).masks
        pruned, tail = self.finetune.run(
            params,
            masks,
            loss_fn,
            data,
            key=retrain_key,
            record={"phase": "prune", "epoch": self.projected_epochs},
            optimizer=self.optimizer,
            batch_size=self.batch_size,
            eval_fn=eval_fn,
            callback=callback,
            checkpoint=checkpoint.slot("retrain") if checkpoint is not None else None,
        )
        history += tail
        return finish(
            params=pruned,
            masks=masks,
            budget=self.budget,
            history=history,
            method="projected_sgd",
            start=start,
            epochs=self.epochs,
        )
