"""Jit-compiled training epochs: plain, ADMM-penalized, and masked.

One epoch is a single ``jax.lax.scan`` over shuffled minibatches, compiled
once per (loss, optimizer, batch size, data shape), so a step costs no Python.
The three kinds differ only in how the gradient and the update are touched:

* plain:  ``g = grad L(W)``;
* ADMM:   ``g = grad L(W) + rho (W - Z + U)`` on prunable leaves (the gradient
  of the augmented Lagrangian's W-part, Zhang et al., ECCV 2018, eq. 6);
* masked: ``g = M * grad L(W)`` before the optimizer and ``u = M * u`` after
  it, so pruned weights receive exactly zero update whatever the optimizer
  (momentum, Adam moments and weight decay included) and stay exactly zero.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admmprune._tree import PyTree, apply_masks
from admmprune.results import with_eval

LossFn = Callable[[PyTree, Any], jax.Array]


class EpochStats(NamedTuple):
    """What one epoch reports: mean minibatch loss, step count, wall seconds."""

    loss: float
    steps: int
    seconds: float


def num_examples(data: PyTree) -> int:
    """The common leading dimension of every array in ``data``."""
    sizes = {int(a.shape[0]) for a in jax.tree.leaves(data)}
    if len(sizes) != 1:
        raise ValueError(f"data arrays disagree on the number of examples: {sorted(sizes)}.")
    return sizes.pop()


def check_batch_size(data: PyTree, batch_size: int) -> int:
    """Validates ``batch_size`` against ``data``; returns the steps per epoch."""
    n = num_examples(data)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {n} training examples; use batch_size <= {n}."
        )
    return n // batch_size


def _scan_steps(
    params: PyTree,
    opt_state: Any,
    data: PyTree,
    batches: jax.Array,
    aux: Any,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    flags: tuple[bool, ...],
    kind: str,
) -> tuple[PyTree, Any, jax.Array]:
    """One optimizer step per row of ``batches`` (example indices), in a ``lax.scan``."""
    treedef = jax.tree.structure(params)

    def touch_grads(grads: PyTree, params: PyTree) -> PyTree:
        if kind == "admm":
            z, u, rho, *metric = aux  # metric: optional penalty weights d (per leaf or per weight)
            g, w, zz, uu = (treedef.flatten_up_to(t) for t in (grads, params, z, u))
            d = treedef.flatten_up_to(metric[0]) if metric else [None] * len(g)
            out = [
                (gi + (rho if di is None else rho * di) * (wi - zi + ui)) if f else gi
                for gi, wi, zi, ui, di, f in zip(g, w, zz, uu, d, flags, strict=True)
            ]
            return jax.tree.unflatten(treedef, out)
        if kind == "masked":
            return jax.tree.map(lambda gi, m: jnp.where(m, gi, 0), grads, aux)
        return grads

    def touch_updates(updates: PyTree) -> PyTree:
        if kind == "masked":
            return jax.tree.map(lambda ui, m: jnp.where(m, ui, 0), updates, aux)
        return updates

    def step(carry: tuple[PyTree, Any], idx: jax.Array) -> tuple[tuple[PyTree, Any], jax.Array]:
        params, opt_state = carry
        batch = jax.tree.map(lambda a: a[idx], data)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        grads = touch_grads(grads, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, touch_updates(updates))
        return (params, opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state, losses


def shuffled_batches(data: PyTree, key: jax.Array, batch_size: int) -> jax.Array:
    """One epoch's minibatches: a ``(steps, batch_size)`` array of example indices.

    A permutation drawn from ``key``; the last partial batch is dropped.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    steps = n // batch_size
    return jax.random.permutation(key, n)[: steps * batch_size].reshape(steps, batch_size)


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "batch_size", "flags", "kind"))
def _epoch(
    params: PyTree,
    opt_state: Any,
    data: PyTree,
    key: jax.Array,
    aux: Any,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    flags: tuple[bool, ...],
    kind: str,
) -> tuple[PyTree, Any, jax.Array]:
    perm = shuffled_batches(data, key, batch_size)
    params, opt_state, losses = _scan_steps(
        params,
        opt_state,
        data,
        perm,
        aux,
        loss_fn=loss_fn,
        optimizer=optimizer,
        flags=flags,
        kind=kind,
    )
    return params, opt_state, jnp.mean(losses)


_steps = jax.jit(_scan_steps, static_argnames=("loss_fn", "optimizer", "flags", "kind"))


def run_steps(
    params: PyTree,
    opt_state: Any,
    data: PyTree,
    batches: jax.Array,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    kind: str = "plain",
    aux: Any = None,
    flags: tuple[bool, ...] = (),
) -> tuple[PyTree, Any, jax.Array]:
    """Steps on the given minibatches (rows of example indices), jit-compiled.

    For solvers that act between steps within an epoch (e.g. projected SGD
    projecting every few batches); ``kind``/``aux``/``flags`` as in
    :func:`run_epoch`. Returns the params, optimizer state and per-step losses.
    """
    return _steps(
        params,
        opt_state,
        data,
        batches,
        aux,
        loss_fn=loss_fn,
        optimizer=optimizer,
        flags=tuple(flags),
        kind=kind,
    )


def run_epoch(
    params: PyTree,
    opt_state: Any,
    data: PyTree,
    key: jax.Array,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    kind: str = "plain",
    aux: Any = None,
    flags: tuple[bool, ...] = (),
) -> tuple[PyTree, Any, EpochStats]:
    """One pass over ``data`` in shuffled minibatches (the last partial batch dropped).

    Args:
        params, opt_state: current parameters and optimizer state.
        data: pytree of arrays with a common leading (example) axis.
        key: PRNG key for the shuffle.
        loss_fn: ``loss_fn(params, batch) -> scalar``, jit-traceable and
            hashable (a module-level function or a ``functools.partial``).
        optimizer: any ``optax.GradientTransformation``.
        batch_size: examples per step.
        kind: ``"plain"``, ``"admm"`` (``aux = (Z, U, rho)`` or
            ``(Z, U, rho, D)`` with D penalty weights (per leaf or per weight), ``flags`` the
            prunable leaves) or ``"masked"`` (``aux`` the boolean masks).

    Returns:
        The new params and optimizer state, and the epoch's mean loss.
    """
    steps = check_batch_size(data, batch_size)
    start = time.perf_counter()
    params, opt_state, loss = _epoch(
        params,
        opt_state,
        data,
        key,
        aux,
        loss_fn=loss_fn,
        optimizer=optimizer,
        batch_size=batch_size,
        flags=tuple(flags),
        kind=kind,
    )
    loss = float(loss)  # waits for the epoch to finish
    seconds = time.perf_counter() - start
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"training loss became {loss} ({kind} epoch); lower the learning rate "
            "or, for ADMM, the initial rho."
        )
    return params, opt_state, EpochStats(loss, steps, seconds)


def train(
    params: PyTree,
    loss_fn: LossFn,
    data: PyTree,
    *,
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int = 128,
    key: jax.Array,
    masks: PyTree | None = None,
    eval_fn: Callable[[PyTree], Mapping[str, float]] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    phase: str = "train",
) -> tuple[PyTree, list[dict[str, Any]]]:
    """Trains ``params`` for ``epochs`` epochs; masked if ``masks`` is given.

    With ``masks``, pruned weights are zeroed first and then receive exactly
    zero gradient and zero update every step (see the module docstring), so
    they are still exactly zero at the end. The optimizer state is created
    fresh from the masked parameters.

    Returns:
        The trained params and one history record per epoch
        (``phase``, ``epoch``, ``loss`` and whatever ``eval_fn`` returns).
    """
    if masks is not None:
        params = apply_masks(params, masks)
    opt_state = optimizer.init(params)
    history: list[dict[str, Any]] = []
    for epoch in range(epochs):
        key, sub = jax.random.split(key)
        params, opt_state, stats = run_epoch(
            params,
            opt_state,
            data,
            sub,
            loss_fn=loss_fn,
            optimizer=optimizer,
            batch_size=batch_size,
            kind="plain" if masks is None else "masked",
            aux=masks,
        )
        record: dict[str, Any] = {
            "phase": phase,
            "epoch": epoch + 1,
            "loss": stats.loss,
            "seconds": stats.seconds,
        }
        history.append(with_eval(record, params, eval_fn))
        if callback is not None:
            callback(record)
    return params, history
