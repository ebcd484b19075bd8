"""The metric of ADMM's splitting: which norm the penalty and the projection use.

The penalty of the W-step is ``rho/2 sum_i d_i (W_i - Z_i + U_i)^2`` and the
Z-step projects in the same metric, which for a sparsity set is the support
of the Euclidean projection of ``sqrt(d) V`` (:func:`scaled`). This is still
ADMM, for the equivalent constraint ``D^(1/2) (W - Z) = 0``. Three metrics:

* :class:`Euclidean`: ``d = 1`` (Zhang et al., ECCV 2018);
* :class:`Fisher`: one weight per layer, the layer's mean empirical-Fisher
  diagonal ``E[(dL/dw)^2]`` at the initial weights;
* :class:`DiagFisher`: one weight per weight, ``d_i = F_ii + damp mean_l(F)``,
  so the Z-step keeps the largest OBD saliency per unit cost ``d_i v_i^2 /
  c_i`` (LeCun et al., "Optimal Brain Damage", NIPS 1990).

The Fisher weights are normalized so their mean over the prunable weights is
1 (rho keeps its meaning); other leaves get 1. They matter when a budget
trades weights across layers at different prices (energy), where the
Euclidean knapsack ranks by ``v^2 / c`` and ignores that a weight of an early
convolution, reused at every position, moves the loss far more than its
magnitude says.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from admmprune._tree import PyTree
from admmprune.training import LossFn, per_example_grads


class Metric(Protocol):
    """A splitting metric: its penalty weights d for a run, and their shape."""

    name: str

    def weights(
        self, params: PyTree, loss_fn: LossFn, data: PyTree, key: jax.Array, flags: list[bool]
    ) -> PyTree | None:
        """The penalty weights d at ``params`` (None: the Euclidean metric)."""
        ...

    def like(self, params: PyTree) -> PyTree | None:
        """Zeros shaped like :meth:`weights`' result, e.g. for a checkpoint template."""
        ...


@dataclasses.dataclass(frozen=True)
class Euclidean:
    """``d = 1``: the penalty ``rho/2 ||W - Z + U||^2`` and the Euclidean projection."""

    name: str = dataclasses.field(default="euclidean", init=False)

    def weights(
        self, params: PyTree, loss_fn: LossFn, data: PyTree, key: jax.Array, flags: list[bool]
    ) -> None:
        del params, loss_fn, data, key, flags
        return None

    def like(self, params: PyTree) -> None:
        del params
        return None


def _check_examples(examples: Any) -> None:
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"metric_examples must be a positive integer, got {examples!r}.")


@dataclasses.dataclass(frozen=True)
class Fisher:
    """One weight per layer: the layer's mean empirical-Fisher diagonal, normalized.

    Args:
        examples: training examples whose per-example gradients estimate it.
    """

    examples: int = 1024
    name: str = dataclasses.field(default="fisher", init=False)

    def __post_init__(self) -> None:
        _check_examples(self.examples)

    def weights(
        self, params: PyTree, loss_fn: LossFn, data: PyTree, key: jax.Array, flags: list[bool]
    ) -> PyTree:
        fisher = fisher_diagonal(params, loss_fn, data, key, self.examples)
        return _normalized(params, [jnp.mean(f) for f in fisher], flags)

    def like(self, params: PyTree) -> PyTree:
        return jax.tree.map(lambda a: jnp.zeros((), jnp.float32), params)


@dataclasses.dataclass(frozen=True)
class DiagFisher:
    """One weight per weight: ``d_i = F_ii + damp mean_l(F)``, normalized.

    Args:
        examples: training examples whose per-example gradients estimate F.
        damp: a fraction of each layer's mean Fisher diagonal, so a weight
            whose sampled gradients vanish keeps a penalty.
    """

    examples: int = 1024
    damp: float = 0.01
    name: str = dataclasses.field(default="diag_fisher", init=False)

    def __post_init__(self) -> None:
        _check_examples(self.examples)
        if not (self.damp >= 0 and jnp.isfinite(self.damp)):
            raise ValueError(f"metric_damp must be >= 0 and finite, got {self.damp}.")

    def weights(
        self, params: PyTree, loss_fn: LossFn, data: PyTree, key: jax.Array, flags: list[bool]
    ) -> PyTree:
        fisher = fisher_diagonal(params, loss_fn, data, key, self.examples)
        return _normalized(params, [f + self.damp * jnp.mean(f) for f in fisher], flags)

    def like(self, params: PyTree) -> PyTree:
        return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), params)


def fisher_diagonal(
    params: PyTree, loss_fn: LossFn, data: PyTree, key: jax.Array, examples: int
) -> list[jax.Array]:
    """The empirical Fisher diagonal ``F_ii = E_x[(dL(x)/dw_i)^2]``, one array per leaf.

    From the per-example gradients of ``examples`` training examples (a
    multiple of the chunk size, at most all of them) drawn with ``key``.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    chunk = min(64, examples, n)
    m = (min(examples, n) // chunk) * chunk
    idx = jax.random.permutation(key, n)[:m]
    sums = _fisher_sums(params, loss_fn, jax.tree.map(lambda a: a[idx], data), chunk)
    return [s / m for s in sums]


def _normalized(params: PyTree, d: list[jax.Array], flags: list[bool]) -> PyTree:
    """``d`` scaled so its mean over the prunable weights is 1; other leaves 1."""
    leaves, treedef = jax.tree.flatten(params)
    total = sum(leaf.size for leaf, f in zip(leaves, flags, strict=True) if f)
    avg = (
        sum(
            float(jnp.sum(jnp.broadcast_to(di, leaf.shape)))
            for di, leaf, f in zip(d, leaves, flags, strict=True)
            if f
        )
        / total
    )
    d = [
        (di / avg if f and avg > 0 else jnp.ones_like(di)).astype(jnp.float32)
        for di, f in zip(d, flags, strict=True)
    ]
    return jax.tree.unflatten(treedef, d)


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk"))
def _fisher_sums(params: PyTree, loss_fn: LossFn, batch: PyTree, chunk: int) -> list[jax.Array]:
    """Per leaf, the sum over examples of squared per-example gradients, entrywise.

    ``batch`` holds a multiple of ``chunk`` examples; per-example gradients
    are formed ``chunk`` at a time (vmap inside a scan), squared and summed
    per chunk, accumulated across chunks in float32.
    """

    def body(total: list[jax.Array], part: PyTree) -> tuple[list[jax.Array], None]:
        g = per_example_grads(loss_fn, params, part)
        sq = [jnp.sum(x * x, axis=0) for x in jax.tree.leaves(g)]
        return [t + s for t, s in zip(total, sq, strict=True)], None

    parts = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), batch)
    init = [jnp.zeros(leaf.shape, jnp.float32) for leaf in jax.tree.leaves(params)]
    total, _ = jax.lax.scan(body, init, parts)
    return total


def scaled(params: PyTree, d: PyTree | None) -> PyTree:
    """``sqrt(d) W``: its Euclidean projection has the support of the projection of
    W in the metric ``sum_i d_i (.)_i^2`` (the identity when ``d`` is None)."""
    if d is None:
        return params
    return jax.tree.map(lambda a, di: a * jnp.sqrt(di).astype(a.dtype), params, d)


METRICS = {"euclidean": Euclidean, "fisher": Fisher, "diag_fisher": DiagFisher}

__all__ = ["METRICS", "DiagFisher", "Euclidean", "Fisher", "Metric", "fisher_diagonal", "scaled"]
