"""The one fine-tuning stage every solver ends with: hard prune, compensate, masked retrain.

Given weights and the mask a solver chose (ADMM's ``Proj_S(W)``, a magnitude
mask, projected SGD's last projection, a one-shot pruner's masks),
:class:`Finetune` zeros the pruned entries -- optionally after a compensation
that moves the kept weights to make up for the removed ones, e.g. the OBS
refit of :func:`admmprune.obs.compensator` (Hassibi & Stork, 1993; Frantar &
Alistarh, 2022) -- and retrains with the mask fixed, so pruned weights stay
exactly zero (:func:`admmprune.training.train`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import optax

from admmprune._tree import PyTree, apply_masks
from admmprune.guards import DIVERGENCE_FACTOR, check_factor, check_masks
from admmprune.results import with_eval
from admmprune.training import Callback, EvalFn, LossFn, train

if TYPE_CHECKING:
    from admmprune.checkpoint import Slot

Compensate = Callable[[PyTree, PyTree], PyTree]


@dataclasses.dataclass(frozen=True)
class Finetune:
    """Hard prune to a mask, optional compensation, then masked retraining.

    Args:
        epochs: masked retraining epochs (0: none).
        optimizer: the retraining optimizer (None: the solver's own).
        compensate: optional ``compensate(params, masks) -> params`` applied
            to the unpruned weights instead of plain zeroing; its output is
            masked again, so it cannot revive pruned weights. The prune
            record then holds both accuracies (``zeroed_*`` and the
            compensated ones).
        divergence_factor: the retraining stops with a
            :class:`~admmprune.guards.DivergenceError` when an epoch's loss
            exceeds this multiple of the pruned network's starting loss (None
            or 0: only a non-finite loss stops it).

    Example:
        >>> ADMM(budget, optax.adam(1e-3), finetune=Finetune(epochs=20))
    """

    epochs: int = 0
    optimizer: optax.GradientTransformation | None = None
    compensate: Compensate | None = None
    divergence_factor: float | None = DIVERGENCE_FACTOR

    def __post_init__(self) -> None:
        check_factor(self.divergence_factor, "Finetune")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"retrain epochs must be a non-negative integer, got {self.epochs!r}.")

    def run(
        self,
        params: PyTree,
        masks: PyTree,
        loss_fn: LossFn,
        data: PyTree,
        *,
        key: jax.Array,
        record: dict[str, Any],
        optimizer: optax.GradientTransformation | None = None,
        batch_size: int = 128,
        eval_fn: EvalFn | None = None,
        callback: Callback | None = None,
        checkpoint: Slot | None = None,
        mesh: Any = None,
    ) -> tuple[PyTree, list[dict[str, Any]]]:
        """Prunes ``params`` to ``masks`` and retrains them with the mask fixed.

        Args:
            params: the weights to prune (unpruned: compensation reads them).
            masks: boolean pytree, True where a weight is kept.
            record: the prune record to fill (``phase``, the solver's step);
                evaluated on the pruned weights.
            optimizer: the solver's optimizer, used when this stage has none.
            checkpoint: the retraining's :class:`~admmprune.checkpoint.Slot`
                (saved every epoch, resumed from when it holds a state).
            mesh: a ``jax.sharding.Mesh`` to retrain data-parallel over.

        Returns:
            The pruned, retrained params and the history: the prune record,
            then one ``"retrain"`` record per epoch.
        """
        check_masks(masks, params)
        pruned = apply_masks(params, masks)
        if self.compensate is not None:
            with_eval(record, pruned, eval_fn, prefix="zeroed_")
            pruned = apply_masks(self.compensate(params, masks), masks)
        history = [with_eval(record, pruned, eval_fn)]
        if callback is not None:
            callback(record)
        if not self.epochs:
            return pruned, history
        opt = self.optimizer or optimizer
        if opt is None:
            raise ValueError("Finetune(epochs > 0) needs an optimizer= for the retraining.")
        pruned, retrain = train(
            pruned,
            loss_fn,
            data,
            optimizer=opt,
            epochs=self.epochs,
            batch_size=batch_size,
            key=key,
            masks=masks,
            eval_fn=eval_fn,
            callback=callback,
            phase="retrain",
            divergence_factor=self.divergence_factor,
            checkpoint=checkpoint,
            mesh=mesh,
        )
        return pruned, history + retrain


__all__ = ["Compensate", "Finetune"]
