"""Euclidean projections of a parameter pytree onto sparsity sets.

Every set here keeps a subset of entries and zeros the rest, so a projection is
a mask followed by :func:`apply_masks`. For a cardinality constraint the
projection is exact and closed-form:

    Proj_{||z||_0 <= k}(v) = argmin_{||z||_0 <= k} ||z - v||^2
                           = v restricted to its k largest |v_i|,

because ``||z - v||^2 = sum_{i not kept} v_i^2`` is smallest when the dropped
entries are the smallest in magnitude (Zhang et al., ECCV 2018, eq. 8).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from admmprune._tree import PyTree, apply_masks, scatter_flat


class _Group(Protocol):
    leaves: tuple[int, ...]
    k: int


def topk_mask_flat(scores: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the ``k`` largest entries of a 1-D ``scores`` array.

    Ties are broken deterministically by position (the earlier entry wins),
    so the mask has exactly ``k`` True entries whatever the input. NaN scores
    sort last. (XLA on the CPU flushes float32 subnormals to zero, so a
    subnormal weight ranks as a zero.)

    Args:
        scores: 1-D array of scores (e.g. ``|w|``).
        k: static number of entries to keep, ``0 <= k <= scores.size``.

    Returns:
        Boolean array of the shape of ``scores`` with exactly ``k`` True.
    """
    n = scores.shape[0]
    if k >= n:
        return jnp.ones((n,), bool)
    if k <= 0:
        return jnp.zeros((n,), bool)
    # A stable ascending sort of -score keeps the earlier index first on ties.
    order = jnp.argsort(-scores, stable=True)
    return jnp.zeros((n,), bool).at[order[:k]].set(True)


@functools.partial(jax.jit, static_argnames=("groups",))
def _topk_masks_leaves(leaves: list[jax.Array], groups: tuple[Any, ...]) -> list[jax.Array]:
    masks = [jnp.ones(leaf.shape, bool) for leaf in leaves]
    for g in groups:
        scores = jnp.concatenate([jnp.abs(leaves[i]).ravel() for i in g.leaves])
        flat = topk_mask_flat(scores, g.k)
        part = scatter_flat(flat, g.leaves, leaves)
        for i in g.leaves:
            masks[i] = part[i]
    return masks


def topk_masks(params: PyTree, groups: Sequence[_Group]) -> PyTree:
    """Masks of the top-k projection, one top-k problem per group.

    Args:
        params: the pytree to project.
        groups: each with ``leaves`` (indices into ``jax.tree.leaves(params)``)
            and ``k`` (static): keep the ``k`` largest ``|w|`` over those
            leaves jointly. Leaves in no group are not pruned (all-True mask).

    Returns:
        A boolean pytree shaped like ``params``.
    """
    leaves, treedef = jax.tree.flatten(params)
    masks = _topk_masks_leaves(leaves, tuple(groups))
    return jax.tree.unflatten(treedef, masks)


def project(params: PyTree, budget: Any) -> PyTree:
    """Euclidean projection of ``params`` onto a budget set.

        Proj_S(V) = argmin_{Z in S} sum_l ||Z_l - V_l||^2

    Args:
        params: any pytree of arrays.
        budget: a :class:`admmprune.Budget`, e.g. ``ParamBudget(keep=0.02)``.

    Returns:
        A pytree like ``params`` with the entries outside the projection's
        support set to exactly zero. Non-prunable leaves are unchanged.

    Examples:
        >>> z = admmprune.project(params, admmprune.ParamBudget(count=5324))
    """
    return apply_masks(params, budget.mask(params))


__all__ = ["apply_masks", "project", "topk_mask_flat", "topk_masks"]
