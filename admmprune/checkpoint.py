"""Checkpoints: any pytree of arrays (an :class:`AdmmState` included) to ``.npz`` and back.

Leaves are stored in ``jax.tree.leaves`` order as plain arrays (PRNG keys as
their key data); the structure comes from a template, e.g. a fresh
``solver.init(params, key)``. A file is written beside its target, flushed to
disk (``fsync``) and renamed over it, so a crash leaves either the old file or
the new one, never half of one; it is read with ``allow_pickle=False``, and a
truncated, empty or foreign file raises :class:`CheckpointError` saying what to
do (zip members carry a CRC-32, checked as they are read).

:class:`RunCheckpoint` is a run's one file: the state of each training phase
that has started (``dense``, ``admm``, ``retrain``: see :meth:`RunCheckpoint.slot`)
with its history and the recipe's fingerprint, all in ``checkpoint.npz``, so the
state and its history can never disagree.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, leaf_names

FORMAT = "admmprune-checkpoint-2"
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, from another run, or missing."""


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaf_arrays(tree: PyTree, prefix: str = "") -> dict[str, np.ndarray]:
    arrays = {}
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        if _is_key(leaf):
            arrays[f"{prefix}key_{i}"] = np.asarray(jax.random.key_data(leaf))
        else:
            arrays[f"{prefix}leaf_{i}"] = np.asarray(leaf)
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to ``path`` atomically and durably: beside it, fsync, rename, fsync the dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the rename itself reaches the disk with the directory's entry
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


_UNREADABLE = (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError)


def _unreadable(path: Path, error: Exception, fix: str) -> CheckpointError:
    """The error for a file np.load cannot read (numpy's own words would mislead:
    "contains pickled data" is said of any file that is not an archive)."""
    what = "empty" if path.stat().st_size == 0 else "truncated or corrupt"
    detail = "a member fails its CRC-32" if "CRC" in str(error) else type(error).__name__
    return CheckpointError(f"{path} is {what}: not a readable .npz archive ({detail}); {fix}.")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read whole (CRC-checked), or a clear error."""
    fix = "delete it (or pass --overwrite) to start afresh; it cannot be resumed"
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            return {name: f[name] for name in f.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except _UNREADABLE as e:
        raise _unreadable(path, e, fix) from None


def _unflatten(arrays: dict[str, np.ndarray], like: PyTree, prefix: str, where: Path) -> PyTree:
    leaves, treedef = jax.tree.flatten(like)
    names = [n for n in arrays if n.startswith(prefix) and n != _META]
    if len(names) != len(leaves):
        raise CheckpointError(
            f"{where} holds {len(names)} arrays{f' for {prefix[:-1]}' if prefix else ''} but "
            f"the template has {len(leaves)} leaves; was it written by a run with the same "
            "model, budget and optimizer?"
        )
    out = []
    for i, leaf in enumerate(leaves):
        name = f"{prefix}key_{i}" if _is_key(leaf) else f"{prefix}leaf_{i}"
        if name not in arrays:
            raise CheckpointError(f"{where} lacks {name}; it does not match the template.")
        a = arrays[name]
        if _is_key(leaf):
            out.append(jax.random.wrap_key_data(jnp.asarray(a)))
            continue
        if a.shape != np.shape(leaf):
            raise CheckpointError(
                f"{where}: leaf {i} has shape {a.shape}, the template {np.shape(leaf)}."
            )
        out.append(jnp.asarray(a, dtype=getattr(leaf, "dtype", None)))
    return jax.tree.unflatten(treedef, out)


def save_checkpoint(path: str | Path, tree: PyTree) -> Path:
    """Writes every leaf of ``tree`` to ``path`` (``.npz``), atomically and durably."""
    return _write_npz(Path(path), _leaf_arrays(tree))


def load_checkpoint(path: str | Path, like: PyTree) -> PyTree:
    """Reads a :func:`save_checkpoint` file into the structure of ``like``.

    Raises:
        CheckpointError: (a ``ValueError``) when the file is unreadable or does
            not match the template (another model, budget or optimizer),
            naming the first mismatch.
    """
    path = Path(path)
    return _unflatten(_read_npz(path), like, "", path)


class Slot(Protocol):
    """One phase's place in a checkpoint: what :func:`admmprune.training.train` and
    :meth:`admmprune.ADMM.run` save after every epoch or iteration and resume from."""

    def restore(self, like: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
        """The saved tree (in ``like``'s structure) and its info, or None if never saved."""
        ...

    def save(self, tree: PyTree, info: dict[str, Any]) -> None:
        """Saves the phase's state and info (JSON: epoch, history)."""
        ...


class RunCheckpoint:
    """A run's phases in one atomic file, tied to the recipe that wrote it.

    ``slot(name)`` gives each phase a :class:`Slot`; saving one phase rewrites
    the whole file with every phase's latest state, its info (history) and
    ``fingerprint``, so a reader sees one consistent moment of the run.

    Args:
        path: the ``.npz`` file.
        fingerprint: identifies the run (a recipe's :meth:`~admmprune.recipes.Recipe.fingerprint`);
            :meth:`open` refuses a file written with another.
    """

    def __init__(self, path: str | Path, fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._arrays: dict[str, np.ndarray] = {}
        self._info: dict[str, dict[str, Any]] = {}

    @classmethod
    def open(cls, path: str | Path, fingerprint: str) -> RunCheckpoint:
        """Reads an existing checkpoint (to resume it).

        Raises:
            CheckpointError: unreadable, not an admmprune run checkpoint, or
                written by another recipe.
        """
        ckpt = cls(path, fingerprint)
        meta = read_meta(ckpt.path)
        if meta.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{ckpt.path} was written by a different recipe (or other settings); "
                "drop --resume and pass --overwrite to start afresh, or use another --out."
            )
        ckpt._arrays = {k: v for k, v in _read_npz(ckpt.path).items() if k != _META}
        ckpt._info = dict(meta["phases"])
        return ckpt

    def phases(self) -> dict[str, dict[str, Any]]:
        """The info saved for each phase so far (e.g. ``{"admm": {"iteration": 12, ...}}``)."""
        return dict(self._info)

    def slot(self, name: str) -> Slot:
        """The :class:`Slot` of phase ``name`` in this file."""
        return _Slot(self, name)

    def _save(self, name: str, tree: PyTree, info: dict[str, Any]) -> None:
        prefix = f"{name}/"
        self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(prefix)}
        self._arrays.update(_leaf_arrays(tree, prefix))
        self._info[name] = info
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "phases": self._info}
        text = json.dumps(meta, allow_nan=False)
        _write_npz(self.path, {**self._arrays, _META: np.array(text)})

    def _restore(self, name: str, like: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
        if name not in self._info:
            return None
        return _unflatten(self._arrays, like, f"{name}/", self.path), self._info[name]


class _Slot:
    def __init__(self, store: RunCheckpoint, name: str) -> None:
        self._store, self._name = store, name

    def restore(self, like: PyTree) -> tuple[PyTree, dict[str, Any]] | None:
        return self._store._restore(self._name, like)

    def save(self, tree: PyTree, info: dict[str, Any]) -> None:
        self._store._save(self._name, tree, info)


def read_meta(path: str | Path) -> dict[str, Any]:
    """A run checkpoint's metadata (format, fingerprint, each phase's info), read alone.

    Raises:
        CheckpointError: the file is unreadable or is not a run checkpoint.
    """
    path = Path(path)
    fix = "delete it (or pass --overwrite) to start afresh"
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            if _META not in f.files:
                raise CheckpointError(
                    f"{path} is not an admmprune run checkpoint (no metadata); {fix}."
                )
            meta = json.loads(str(f[_META]))
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except _UNREADABLE as e:
        raise _unreadable(path, e, fix) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by another version of admmprune; {fix}.")
    return meta


def save_params(path: str | Path, params: PyTree) -> Path:
    """Writes ``params`` as ``.npz``, one array per leaf keyed by its ``/``-joined path.

    ``{"fc1": {"kernel": ...}}`` is stored under ``"fc1/kernel"``, so the file
    reads in numpy alone (``np.load(path)["fc1/kernel"]``).
    """
    arrays = dict(zip(leaf_names(params), map(np.asarray, jax.tree.leaves(params)), strict=True))
    if len(arrays) != len(jax.tree.leaves(params)):
        raise ValueError("two leaves share a path name; cannot save them by name.")
    return _write_npz(Path(path), arrays)


def load_params(path: str | Path, like: PyTree) -> PyTree:
    """Reads a :func:`save_params` file into ``like``'s structure, checking names and shapes.

    Raises:
        CheckpointError: (a ``ValueError``) for an unreadable file or one that
            does not match the model, naming the missing, extra or misshapen leaves.
    """
    path = Path(path)
    names = leaf_names(like)
    leaves, treedef = jax.tree.flatten(like)
    arrays = _read_npz(path)
    missing = sorted(set(names) - set(arrays))
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        raise CheckpointError(f"{path} does not match the model: missing {missing}, extra {extra}.")
    out = []
    for name, leaf in zip(names, leaves, strict=True):
        a = arrays[name]
        if a.shape != np.shape(leaf):
            raise CheckpointError(
                f"{path}: {name} has shape {a.shape}, the model {np.shape(leaf)}."
            )
        out.append(jnp.asarray(a, dtype=getattr(leaf, "dtype", None)))
    return jax.tree.unflatten(treedef, out)


__all__ = [
    "CheckpointError",
    "RunCheckpoint",
    "Slot",
    "load_checkpoint",
    "load_params",
    "read_meta",
    "save_checkpoint",
    "save_params",
]
