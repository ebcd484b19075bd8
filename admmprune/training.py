"""Jit-compiled training epochs: plain, with a gradient term, and masked.

One epoch is a single ``jax.lax.scan`` over shuffled minibatches, compiled
once per (loss, optimizer, batch size, data shape), so a step costs no Python.
They differ only in how the gradient and the update are touched:

* plain:  ``g = grad L(W)``;
* with a ``grad_term`` (a hashable ``term(grads, params, term_args) ->
  grads``): e.g. ADMM's penalty gradient ``g + rho (W - Z + U)``
  (:class:`admmprune.admm.Penalty`), with its arrays in ``term_args``;
* masked: ``g = M * grad L(W)`` before the optimizer and ``u = M * u`` after
  it, so pruned weights receive exactly zero update whatever the optimizer
  (momentum, Adam moments and weight decay included) and stay exactly zero.

Also :func:`per_example_grads`, the one place per-example gradients are formed
(the Fisher metrics of ADMM, WoodFisher).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

try:  # meshes carry axis types from jax 0.6 on
    from jax.sharding import AxisType
except ImportError:  # pragma: no cover - older jax: every mesh is automatic
    AxisType = None

from admmprune._tree import PyTree, apply_masks
from admmprune.guards import (
    DIVERGENCE_FACTOR,
    DivergenceError,
    LossWatch,
    check_data,
    check_factor,
    check_masks,
    check_params,
    start_loss,
)
from admmprune.results import with_eval

if TYPE_CHECKING:
    from admmprune.checkpoint import Slot

LossFn = Callable[[PyTree, Any], jax.Array]
EvalFn = Callable[[PyTree], Mapping[str, float]]
Callback = Callable[[dict[str, Any]], None]
GradTerm = Callable[[PyTree, PyTree, Any], PyTree]


def per_example_grads(loss_fn: LossFn, params: PyTree, batch: PyTree) -> PyTree:
    """Each example's gradient: a pytree like ``params`` with a leading example axis.

    ``batch`` is a pytree of arrays with a common leading axis; every example
    is passed to ``loss_fn`` as a batch of one (``jax.vmap`` over
    ``jax.grad``).
    """
    return jax.vmap(lambda ex: jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[None], ex)))(
        batch
    )


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
    masks: PyTree,
    term_args: Any,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    grad_term: GradTerm | None,
    batch_sharding: Any = None,
) -> tuple[PyTree, Any, jax.Array]:
    """One optimizer step per row of ``batches`` (example indices), in a ``lax.scan``.

    With ``batch_sharding`` (a ``NamedSharding`` splitting the example axis),
    every minibatch is laid out across the mesh: each device computes the loss
    and gradient of its slice, and XLA's SPMD partitioner sums them (data
    parallelism); params and optimizer state stay replicated.
    """

    def touch_grads(grads: PyTree, params: PyTree) -> PyTree:
        if grad_term is not None:
            grads = grad_term(grads, params, term_args)
        if masks is not None:
            return jax.tree.map(lambda gi, m: jnp.where(m, gi, 0), grads, masks)
        return grads

    def touch_updates(updates: PyTree) -> PyTree:
        if masks is not None:
            return jax.tree.map(lambda ui, m: jnp.where(m, ui, 0), updates, masks)
        return updates

    def step(carry: tuple[PyTree, Any], idx: jax.Array) -> tuple[tuple[PyTree, Any], jax.Array]:
        params, opt_state = carry
        batch = jax.tree.map(lambda a: a[idx], data)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
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


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "optimizer", "batch_size", "grad_term", "batch_sharding")
)
def _epoch(
    params: PyTree,
    opt_state: Any,
    data: PyTree,
    key: jax.Array,
    masks: PyTree,
    term_args: Any,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    grad_term: GradTerm | None,
    batch_sharding: Any = None,
) -> tuple[PyTree, Any, jax.Array]:
    perm = shuffled_batches(data, key, batch_size)
    params, opt_state, losses = _scan_steps(
        params,
        opt_state,
        data,
        perm,
        masks,
        term_args,
        loss_fn=loss_fn,
        optimizer=optimizer,
        grad_term=grad_term,
        batch_sharding=batch_sharding,
    )
    return params, opt_state, jnp.mean(losses)


_steps = jax.jit(_scan_steps, static_argnames=("loss_fn", "optimizer", "grad_term"))


def run_steps(
    params: PyTree,
    opt_state: Any,
    data: PyTree,
    batches: jax.Array,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    masks: PyTree | None = None,
    grad_term: GradTerm | None = None,
    term_args: Any = None,
) -> tuple[PyTree, Any, jax.Array]:
    """Steps on the given minibatches (rows of example indices), jit-compiled.

    For solvers that act between steps within an epoch (e.g. projected SGD
    projecting every few batches); ``masks``/``grad_term``/``term_args`` as
    in :func:`run_epoch`. Returns the params, optimizer state and per-step
    losses.
    """
    return _steps(
        params,
        opt_state,
        data,
        batches,
        masks,
        term_args,
        loss_fn=loss_fn,
        optimizer=optimizer,
        grad_term=grad_term,
    )


def place_on_mesh(
    mesh: Mesh, data: PyTree, replicated: PyTree, batch_size: int
) -> tuple[PyTree, PyTree, NamedSharding]:
    """Lays a data-parallel epoch out on ``mesh`` (its first axis splits examples).

    The epoch runs under XLA's automatic SPMD partitioning (a mesh with explicit
    axes, as ``jax.make_mesh`` builds, is used with automatic ones). The training
    data is sharded along its example axis when the example count
    divides evenly (else replicated), ``replicated`` (params, optimizer state,
    ADMM's Z and U, masks) is copied to every device, and the returned
    sharding splits each minibatch across the devices. Arrays already laid out
    so are not copied again. For many hosts, call ``jax.distributed.initialize()``
    on each first and build the mesh over ``jax.devices()``.

    Raises:
        ValueError: ``batch_size`` is not a multiple of the mesh's first axis.
    """
    types = getattr(mesh, "axis_types", ())
    if AxisType is not None and any(t != AxisType.Auto for t in types):  # jax.make_mesh's
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)
    axis = mesh.axis_names[0]
    size = int(mesh.shape[axis])
    if batch_size % size:
        raise ValueError(
            f"batch_size={batch_size} does not split over the {size} devices of the mesh; use "
            f"a multiple of {size}."
        )
    n = num_examples(data)
    split = NamedSharding(mesh, P(axis)) if n % size == 0 else NamedSharding(mesh, P())
    data = jax.device_put(data, split)
    replicated = jax.device_put(replicated, NamedSharding(mesh, P()))
    return data, replicated, NamedSharding(mesh, P(axis))


def run_epoch(
    params: PyTree,
    opt_state: Any,
    data: PyTree,
    key: jax.Array,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    masks: PyTree | None = None,
    grad_term: GradTerm | None = None,
    term_args: Any = None,
    phase: str = "training",
    mesh: Mesh | None = None,
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
        masks: boolean pytree: masked training (pruned weights get exactly
            zero gradient and update).
        grad_term: hashable ``grad_term(grads, params, term_args) -> grads``
            applied to every step's gradient (e.g. ADMM's penalty).
        term_args: the arrays ``grad_term`` reads (traced, not static).
        phase: named in the error when the loss goes non-finite.
        mesh: a ``jax.sharding.Mesh`` to run data-parallel over (see
            :func:`place_on_mesh`); None: one device.

    Returns:
        The new params and optimizer state, and the epoch's mean loss.
    """
    steps = check_batch_size(data, batch_size)
    batch_sharding = None
    if mesh is not None:
        data, (params, opt_state, masks, term_args), batch_sharding = place_on_mesh(
            mesh, data, (params, opt_state, masks, term_args), batch_size
        )
    start = time.perf_counter()
    params, opt_state, loss = _epoch(
        params,
        opt_state,
        data,
        key,
        masks,
        term_args,
        loss_fn=loss_fn,
        optimizer=optimizer,
        batch_size=batch_size,
        grad_term=grad_term,
        batch_sharding=batch_sharding,
    )
    loss = float(loss)  # waits for the epoch to finish
    seconds = time.perf_counter() - start
    if not math.isfinite(loss):
        raise DivergenceError(
            f"training loss became {loss} ({phase} epoch); lower the learning rate "
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
    eval_fn: EvalFn | None = None,
    callback: Callback | None = None,
    phase: str = "train",
    divergence_factor: float | None = DIVERGENCE_FACTOR,
    checkpoint: Slot | None = None,
    mesh: Mesh | None = None,
) -> tuple[PyTree, list[dict[str, Any]]]:
    """Trains ``params`` for ``epochs`` epochs; masked if ``masks`` is given.

    With ``masks``, pruned weights are zeroed first and then receive exactly
    zero gradient and zero update every step (see the module docstring), so
    they are still exactly zero at the end. The optimizer state is created
    fresh from the masked parameters.

    Args:
        divergence_factor: stop with :class:`~admmprune.guards.DivergenceError`
            when an epoch's mean loss exceeds this multiple of the loss at the
            start (on the first minibatch); None or 0: only non-finite losses stop.
        checkpoint: a :class:`~admmprune.checkpoint.Slot`: the params, optimizer
            state, key and history are saved after every epoch, and a run that
            finds a saved state continues from it, bit for bit as if never stopped.
        mesh: train data-parallel over this ``jax.sharding.Mesh``
            (:func:`place_on_mesh`).

    Returns:
        The trained params and one history record per epoch
        (``phase``, ``epoch``, ``loss`` and whatever ``eval_fn`` returns).

    Raises:
        InputError: non-finite or non-float params, non-finite data, masks
            unlike the params.
        DivergenceError: the loss went non-finite or diverged.
    """
    check_params(params)
    check_data(data)
    check_factor(divergence_factor, "train")
    check_batch_size(data, batch_size)
    if masks is not None:
        check_masks(masks, params)
        params = apply_masks(params, masks)
    if mesh is not None:  # laid out once; every epoch then finds it in place
        data = place_on_mesh(mesh, data, None, batch_size)[0]
    opt_state = optimizer.init(params)
    history: list[dict[str, Any]] = []
    first = 0
    reference = None
    saved = None
    if checkpoint is not None:
        saved = checkpoint.restore({"params": params, "opt_state": opt_state, "key": key})
    if saved is not None:
        tree, info = saved
        params, opt_state, key = tree["params"], tree["opt_state"], tree["key"]
        history, first, reference = list(info["history"]), int(info["epoch"]), info["reference"]
    else:
        reference = start_loss(loss_fn, params, data, batch_size)
        reference = reference if math.isfinite(reference) else None
    watch = LossWatch(phase, math.inf if reference is None else reference, divergence_factor)
    for epoch in range(first, epochs):
        key, sub = jax.random.split(key)
        params, opt_state, stats = run_epoch(
            params,
            opt_state,
            data,
            sub,
            loss_fn=loss_fn,
            optimizer=optimizer,
            batch_size=batch_size,
            masks=masks,
            phase=phase,
            mesh=mesh,
        )
        watch(stats.loss, f"epoch {epoch + 1}")
        record: dict[str, Any] = {
            "phase": phase,
            "epoch": epoch + 1,
            "loss": stats.loss,
            "seconds": stats.seconds,
        }
        history.append(with_eval(record, params, eval_fn))
        if callback is not None:
            callback(record)
        if checkpoint is not None:
            state = {"params": params, "opt_state": opt_state, "key": key}
            checkpoint.save(state, {"epoch": epoch + 1, "history": history, "reference": reference})
    return params, history
