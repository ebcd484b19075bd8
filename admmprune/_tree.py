"""Pytree helpers: leaf names, the default prunable filter, masking, norms.

Every solver in admmprune works on an arbitrary parameter pytree. Leaves are
named by their pytree path joined with ``/`` (``"fc1/kernel"``), which is the
name budgets, reports and ``params.npz`` files use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
PrunableFilter = Callable[[str, Any], bool]


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple[Any, ...]) -> str:
    """Joins a pytree key path into a ``/``-separated name, e.g. ``"fc1/kernel"``."""
    return "/".join(_key_name(k) for k in path)


def leaf_names(tree: PyTree) -> list[str]:
    """The ``/``-joined path of every leaf, in ``jax.tree.leaves`` order."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """``{name: leaf}`` for every leaf, in ``jax.tree.leaves`` order."""
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def default_prunable(name: str, leaf: Any) -> bool:
    """Kernels and weight matrices are prunable; biases and norm scales are not.

    A leaf is prunable when it has two or more dimensions (dense kernels,
    convolution kernels, embeddings). One-dimensional leaves (biases, norm
    scales and offsets) and scalars are left alone.
    """
    del name
    return getattr(leaf, "ndim", 0) >= 2


def prunable_flags(tree: PyTree, prunable: PrunableFilter | None = None) -> list[bool]:
    """Which leaves (in ``jax.tree.leaves`` order) a budget may prune."""
    keep = prunable or default_prunable
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [bool(keep(path_name(p), leaf)) for p, leaf in flat]


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zeros every entry whose mask is False (``where``, so NaN/inf do not leak)."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sq_norm(tree: PyTree, flags: list[bool] | None = None) -> jax.Array:
    """Sum of squares over the leaves selected by ``flags`` (all if None), in float32."""
    leaves = jax.tree.leaves(tree)
    if flags is None:
        flags = [True] * len(leaves)
    total = jnp.zeros((), jnp.float32)
    for leaf, f in zip(leaves, flags, strict=True):
        if f:
            total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return total


def scatter_flat(flat: Any, indices: Sequence[int], leaves: Sequence[Any]) -> list[Any]:
    """Masks for ``leaves`` from one flat mask over the leaves at ``indices``, in order.

    ``flat`` is the concatenation of the listed leaves' raveled masks; every
    other leaf gets an all-True mask. numpy in, numpy out; jax otherwise.
    """
    xp = np if isinstance(flat, np.ndarray) else jnp
    masks = [xp.ones(np.shape(leaf), bool) for leaf in leaves]
    offset = 0
    for i in indices:
        size = int(np.prod(np.shape(leaves[i])))
        masks[i] = flat[offset : offset + size].reshape(np.shape(leaves[i]))
        offset += size
    return masks
