"""Structured baselines in the same API as :class:`admmprune.ADMM`: L1-norm filter
pruning and network slimming.

Both take a structured budget (:class:`admmprune.structured.ChannelBudget` or
:class:`~admmprune.structured.MacsBudget`), choose its channels by their own
ranking instead of the projection's ``||w_g||^2``, and end with the same
:class:`admmprune.Finetune` stage as every solver.

References:
    H. Li, A. Kadav, I. Durdanovic, H. Samet, H. P. Graf, "Pruning Filters for
    Efficient ConvNets", ICLR 2017 (rank filters by ``sum |w|``).
    Z. Liu, J. Li, Z. Shen, G. Huang, S. Yan, C. Zhang, "Learning Efficient
    Convolutional Networks through Network Slimming", ICCV 2017 (train with
    ``lambda * sum |gamma|`` on BatchNorm scales, prune the channels of
    smallest ``|gamma|``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admmprune._tree import PyTree, apply_masks, named_leaves
from admmprune.finetune import Finetune
from admmprune.guards import check_inputs, check_model_params
from admmprune.results import PruneResult, finish
from admmprune.structured import StructuredBudget
from admmprune.training import Callback, EvalFn, LossFn, check_batch_size, train

if TYPE_CHECKING:
    from admmprune.checkpoint import RunCheckpoint


def _prune_and_finetune(
    solver: Any,
    params: PyTree,
    masks: PyTree,
    loss_fn: LossFn,
    data: PyTree,
    key: jax.Array,
    eval_fn: EvalFn | None,
    callback: Callback | None,
    history: list[dict[str, Any]],
    method: str,
    start: float,
    checkpoint: RunCheckpoint | None = None,
) -> PruneResult:
    pruned, tail = solver.finetune.run(
        params,
        masks,
        loss_fn,
        data,
        key=key,
        record={"phase": "prune", "round": 1},
        optimizer=solver.optimizer,
        batch_size=solver.batch_size,
        eval_fn=eval_fn,
        callback=callback,
        checkpoint=checkpoint.slot("retrain") if checkpoint is not None else None,
    )
    return finish(
        params=pruned,
        masks=masks,
        budget=solver.budget,
        history=history + tail,
        method=method,
        start=start,
        epochs=solver.epochs,
    )


@dataclasses.dataclass(frozen=True)
class L1FilterPrune:
    """L1-norm filter (neuron) pruning: keep the budget's channels of largest ``sum |w|``.

    A channel's score is the L1 norm of its producer kernel slice (Li et al.,
    ICLR 2017, for filters; a dense layer's neurons the same way); the
    budget decides how many channels each group keeps (for a MACs budget, by
    its greedy on these scores), then ``finetune`` retrains with the mask fixed.
    """

    budget: StructuredBudget
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
        start = time.perf_counter()
        check_inputs(params, data, self.budget, "L1FilterPrune")
        check_batch_size(data, self.batch_size)
        scores = self.budget.structure.l1_scores(params)
        masks = self.budget.project_by(params, scores).masks
        return _prune_and_finetune(
            self,
            params,
            masks,
            loss_fn,
            data,
            key,
            eval_fn,
            callback,
            [],
            "l1_filter",
            start,
            checkpoint,
        )


_UNRANKED = (
    1e30  # above any |gamma|, below a channel budget's floor (inf); finite for the MACs greedy
)


def norm_scales(budget: StructuredBudget, params: PyTree) -> dict[str, list[str]]:
    """Per group, the one-dimensional producer leaves named ``*scale`` (BatchNorm's gamma)."""
    leaves = named_leaves(params)
    out = {}
    for g in budget.structure.groups:
        out[g.name] = [
            m.leaf for m in g.producers if m.leaf.endswith("scale") and np.ndim(leaves[m.leaf]) == 1
        ]
    return out


@dataclasses.dataclass(frozen=True)
class NetworkSlimming:
    """Network slimming: sparsity training with L1 on BatchNorm scales, then prune by ``|gamma|``.

    ``sparsity_epochs`` epochs minimize ``L(W) + l1 * sum |gamma|`` over every
    BatchNorm scale that belongs to a channel group (Liu et al., ICCV 2017,
    use ``l1 = 1e-4`` to ``1e-5``); each channel's score is then its
    ``|gamma|`` (summed over the BatchNorms of a residual-joined group) and the
    budget keeps the largest; ``finetune`` retrains.

    A group without a BatchNorm scale ranks above every other channel (below
    only the budget's per-group floors), so it is pruned only when the budget
    cannot be met otherwise.

    Raises:
        ValueError: when no group has a BatchNorm scale.
    """

    budget: StructuredBudget
    optimizer: optax.GradientTransformation
    sparsity_epochs: int = 10
    l1: float = 1e-4
    finetune: Finetune = Finetune(epochs=5)
    batch_size: int = 128

    @property
    def epochs(self) -> int:
        return self.sparsity_epochs + self.finetune.epochs

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
        start = time.perf_counter()
        check_inputs(params, data, self.budget, "NetworkSlimming")
        check_batch_size(data, self.batch_size)
        scales = norm_scales(self.budget, params)
        if not any(scales.values()):
            raise ValueError(
                "network slimming ranks channels by BatchNorm scales, and no channel group of "
                "this network has one; use L1FilterPrune or ADMM."
            )
        names = sorted({leaf for s in scales.values() for leaf in s})
        sparse_loss = _SlimLoss(loss_fn, tuple(names), float(self.l1))
        key, sub = jax.random.split(key)
        params, history = train(
            params,
            sparse_loss,
            data,
            optimizer=self.optimizer,
            epochs=self.sparsity_epochs,
            batch_size=self.batch_size,
            key=sub,
            eval_fn=eval_fn,
            callback=callback,
            phase="sparsity",
        )
        leaves = named_leaves(params)
        size = {g.name: g.size for g in self.budget.structure.groups}
        scores = {  # a group without BatchNorm is not slimmed: it ranks above every other
            g: sum(jnp.abs(leaves[leaf]) for leaf in s) if s else jnp.full(size[g], _UNRANKED)
            for g, s in scales.items()
        }
        masks = self.budget.project_by(params, scores).masks
        return _prune_and_finetune(
            self,
            params,
            masks,
            loss_fn,
            data,
            key,
            eval_fn,
            callback,
            history,
            "slimming",
            start,
            checkpoint,
        )


@dataclasses.dataclass(frozen=True)
class _SlimLoss:
    """``loss_fn(params, batch) + l1 * sum |gamma|`` (hashable, for the jitted epochs)."""

    loss_fn: LossFn
    names: tuple[str, ...]
    l1: float

    def __call__(self, params: PyTree, batch: Any) -> jax.Array:
        leaves = named_leaves(params)
        penalty = sum(jnp.sum(jnp.abs(leaves[n])) for n in self.names)
        return self.loss_fn(params, batch) + self.l1 * penalty


def _consumer_rows(member: Any, shape: tuple[int, ...], size: int) -> np.ndarray:
    """The channel of every row of ``kernel_rows``' input axis (``-1``: none)."""
    pos = member.positions(shape[member.axis])
    grid = np.indices(shape[:-1])[member.axis] if member.axis < len(shape) - 1 else None
    if grid is None:
        raise ValueError(f"{member.leaf}: a consumer along the output axis.")
    return pos[grid.ravel()]


def obs_channel_costs(
    structure: Any, model: Any, params: PyTree, x: jax.Array, *, damp: float = 0.01
) -> dict[str, jax.Array]:
    """Per channel, the OBS cost of removing it: the least rise in its consumers' outputs.

    For each consumer layer (``W``: ``d_out x d_in``, input Hessian ``H = X^T X / n``
    on calibration inputs) and the input rows ``R`` a channel feeds, removing
    them and refitting every other weight of the layer optimally raises the
    layer's output error by

        dE = tr(W_R [(H^-1)_RR]^-1 W_R^T)

    (Hassibi & Stork's OBS for a block; the structured form of OBC / ZipLM,
    Frantar et al. 2022, Kurtic et al. 2023). A channel's cost sums over its
    consumers; the budget keeps the channels of largest cost.
    """
    from admmprune.obs import calibration_inputs, damped, hessian, kernel_rows

    leaves = named_leaves(params)
    inputs = calibration_inputs(model, params, x)
    out = {}
    with jax.enable_x64(True):
        for g in structure.groups:
            total = jnp.zeros(g.size, jnp.float64)
            for m in g.consumers:
                if m.leaf not in inputs:
                    continue
                kernel = leaves[m.leaf]
                rows = _consumer_rows(m, np.shape(kernel), g.size)
                h = damped(jnp.asarray(hessian(inputs[m.leaf]), jnp.float64), damp)
                chol = jax.scipy.linalg.cho_factor(h, lower=True)
                hinv = jax.scipy.linalg.cho_solve(chol, jnp.eye(h.shape[0], dtype=h.dtype))
                w = jnp.asarray(kernel_rows(kernel), jnp.float64)
                r = np.stack([np.flatnonzero(rows == c) for c in range(g.size)])  # (C, per)
                blocks = hinv[r[:, :, None], r[:, None, :]]  # (C, per, per)
                wr = jnp.transpose(w[:, r], (1, 2, 0))  # (C, per, d_out)
                total = total + jnp.sum(wr * jnp.linalg.solve(blocks, wr), axis=(1, 2))
            out[g.name] = total.astype(jnp.float32)
    return out


def _needs_refit(mask: jax.Array) -> jax.Array:
    """``mask`` where a kernel lost input positions, else all True (nothing to refit)."""
    m = np.asarray(mask)
    if m.ndim < 2:
        return jnp.ones(m.shape, bool)
    rows = m.reshape(-1, m.shape[-1]).any(axis=1)
    return jnp.asarray(m) if not rows.all() else jnp.ones(m.shape, bool)


@dataclasses.dataclass(frozen=True)
class StructuredOBS:
    """Structured one-shot OBS: keep the channels whose removal costs most, refit the rest.

    Scores every channel by :func:`obs_channel_costs` (the consumers' OBS
    cost of losing it) on ``calibration_examples`` training inputs; the
    budget keeps the highest-scoring channels; every kept weight of every
    layer is then refit by least squares to the dense layer's output on the
    same inputs (:func:`admmprune.obs.prune_layerwise` with the masks, which
    makes up for the removed input channels in the next layer); ``finetune``
    retrains.
    """

    budget: StructuredBudget
    model: Any
    optimizer: optax.GradientTransformation
    calibration_examples: int = 4096
    damp: float = 0.01
    finetune: Finetune = Finetune(epochs=0)
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
        from admmprune.obs import prune_layerwise

        start = time.perf_counter()
        check_inputs(params, data, self.budget, "StructuredOBS")
        check_model_params(self.model, params, "StructuredOBS")
        x = data[0]
        key, sub = jax.random.split(key)
        pick = jax.random.permutation(sub, int(x.shape[0]))[: self.calibration_examples]
        xc = x[pick]
        scores = obs_channel_costs(self.budget.structure, self.model, params, xc, damp=self.damp)
        masks = self.budget.project_by(params, scores).masks
        # Only layers that lost input channels have anything to make up for; a layer
        # that lost output channels only keeps its other columns as they are.
        refit_masks = jax.tree.map(_needs_refit, masks)
        refit, _, _ = prune_layerwise(
            self.model, params, xc, None, masks=refit_masks, damp=self.damp
        )
        refit = apply_masks(refit, masks)
        return _prune_and_finetune(
            self,
            refit,
            masks,
            loss_fn,
            data,
            key,
            eval_fn,
            callback,
            [],
            "structured_obs",
            start,
            checkpoint,
        )


__all__ = [
    "L1FilterPrune",
    "NetworkSlimming",
    "StructuredOBS",
    "norm_scales",
    "obs_channel_costs",
]
