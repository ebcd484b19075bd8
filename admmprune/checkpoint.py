"""Checkpoints: any pytree of arrays (an :class:`AdmmState` included) to ``.npz`` and back.

Leaves are stored in ``jax.tree.leaves`` order as plain arrays (PRNG keys as
their key data); the structure comes from a template, e.g. a fresh
``solver.init(params, key)``. Files are written atomically and read with
``allow_pickle=False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, leaf_names


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def save_checkpoint(path: str | Path, tree: PyTree) -> Path:
    """Writes every leaf of ``tree`` to ``path`` (``.npz``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        if _is_key(leaf):
            arrays[f"key_{i}"] = np.asarray(jax.random.key_data(leaf))
        else:
            arrays[f"leaf_{i}"] = np.asarray(leaf)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, like: PyTree) -> PyTree:
    """Reads a checkpoint into the structure of ``like``.

    Raises:
        ValueError: when the file does not match the template (another model,
            budget or optimizer), naming the first mismatch.
    """
    leaves, treedef = jax.tree.flatten(like)
    with np.load(Path(path), allow_pickle=False) as f:
        files = set(f.files)
        if len(files) != len(leaves):
            raise ValueError(
                f"{path} holds {len(files)} arrays but the template has {len(leaves)} leaves; "
                "was it written by a run with the same model, budget and optimizer?"
            )
        out = []
        for i, leaf in enumerate(leaves):
            name = f"key_{i}" if _is_key(leaf) else f"leaf_{i}"
            if name not in files:
                raise ValueError(f"{path} lacks {name}; it does not match the template.")
            if _is_key(leaf):
                out.append(jax.random.wrap_key_data(jnp.asarray(f[name])))
                continue
            a = f[name]
            if a.shape != np.shape(leaf):
                raise ValueError(
                    f"{path}: leaf {i} has shape {a.shape}, the template {np.shape(leaf)}."
                )
            out.append(jnp.asarray(a, dtype=getattr(leaf, "dtype", None)))
    return jax.tree.unflatten(treedef, out)


def save_params(path: str | Path, params: PyTree) -> Path:
    """Writes ``params`` as ``.npz``, one array per leaf keyed by its ``/``-joined path.

    ``{"fc1": {"kernel": ...}}`` is stored under ``"fc1/kernel"``, so the file
    reads in numpy alone (``np.load(path)["fc1/kernel"]``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(leaf_names(params), map(np.asarray, jax.tree.leaves(params)), strict=True))
    if len(arrays) != len(jax.tree.leaves(params)):
        raise ValueError("two leaves share a path name; cannot save them by name.")
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_params(path: str | Path, like: PyTree) -> PyTree:
    """Reads a :func:`save_params` file into ``like``'s structure, checking names and shapes."""
    names = leaf_names(like)
    leaves, treedef = jax.tree.flatten(like)
    with np.load(Path(path), allow_pickle=False) as f:
        missing = sorted(set(names) - set(f.files))
        extra = sorted(set(f.files) - set(names))
        if missing or extra:
            raise ValueError(f"{path} does not match the model: missing {missing}, extra {extra}.")
        out = []
        for name, leaf in zip(names, leaves, strict=True):
            a = f[name]
            if a.shape != np.shape(leaf):
                raise ValueError(f"{path}: {name} has shape {a.shape}, the model {np.shape(leaf)}.")
            out.append(jnp.asarray(a, dtype=getattr(leaf, "dtype", None)))
    return jax.tree.unflatten(treedef, out)
