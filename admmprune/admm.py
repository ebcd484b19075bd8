"""ADMM pruning (Zhang et al., ECCV 2018), then hard prune and masked retraining.

The problem ``minimize L(W) s.t. W in S`` is split with a copy Z of the
prunable weights, ``minimize L(W) + g_S(Z) s.t. W = Z`` (g_S the indicator of
the budget set S), and solved with scaled-dual ADMM:

    W-step:  W <- approx argmin_W  L(W) + rho/2 ||W - Z + U||^2
             (``epochs_per_iteration`` epochs of any optax optimizer)
    Z-step:  Z <- Proj_S(W + U)          (exact, analytic; see ``projections``)
    U-step:  U <- U + W - Z

with residuals ``r = ||W - Z||`` (primal) and ``s = rho ||Z - Z_prev||``
(dual) recorded every iteration (Boyd et al., 2011, section 3.3). When rho
changes the scaled dual is rescaled, ``U <- U rho_old / rho_new``, so the
unscaled multiplier ``rho U`` is unchanged (Boyd et al., section 3.4.1).

After the last iteration W is hard-pruned to the support of ``Proj_S(W)`` and
retrained with that mask fixed (:class:`admmprune.finetune.Finetune`, the
stage every solver ends with); pruned weights stay exactly zero. The splitting
may use a non-Euclidean metric (:mod:`admmprune.metrics`).

References:
    T. Zhang et al., "A Systematic DNN Weight Pruning Framework using
    Alternating Direction Method of Multipliers", ECCV 2018.
    S. Boyd et al., "Distributed Optimization and Statistical Learning via
    the Alternating Direction Method of Multipliers", FnT ML 2011.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admmprune._tree import PyTree, apply_masks, sq_norm
from admmprune.budgets import Budget
from admmprune.finetune import Finetune
from admmprune.guards import (
    DIVERGENCE_FACTOR,
    LossWatch,
    check_budget,
    check_factor,
    check_inputs,
    reference_loss,
)
from admmprune.metrics import Euclidean, Metric, scaled
from admmprune.results import PruneResult, finish, with_eval
from admmprune.training import (
    Callback,
    EvalFn,
    LossFn,
    check_batch_size,
    place_on_mesh,
    run_epoch,
)

if TYPE_CHECKING:
    from admmprune.checkpoint import RunCheckpoint

Schedule = Callable[[int], float]


@dataclasses.dataclass(frozen=True)
class GeometricRho:
    """The usual ADMM penalty schedule: ``rho_k = min(rho growth^k, cap)``.

    Computed in Python floats, so the sequence is exact whatever the dtype of
    the run. ``growth`` 1.1-2 makes W meet Z (Boyd et al., section 3.4.1).
    """

    rho: float
    growth: float = 1.0
    cap: float = math.inf

    def __post_init__(self) -> None:
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise ValueError(f"rho must be positive and finite, got {self.rho}.")
        if self.growth < 1:
            raise ValueError(f"rho_growth must be >= 1 (1 = constant), got {self.growth}.")
        if self.cap < self.rho:
            raise ValueError(f"rho_max={self.cap} is below rho={self.rho}.")

    def __call__(self, step: int) -> float:
        return min(self.rho * self.growth**step, self.cap)


@dataclasses.dataclass(frozen=True)
class BudgetRamp:
    """Progressive ADMM's budget schedule (Ye et al., 2018): the Z-step of iteration
    ``k`` (0-based) projects onto ``budget.relax(min(1, (k + 1) / iterations))``.

    The budget moves from dense to the target over ``iterations`` ADMM
    iterations (geometrically; see the budget's ``relax``), so W is pulled
    toward a sparse set gradually and the loss, through the W-steps and the
    dual, has time to decide which weights survive before the full cut.
    """

    iterations: int

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int):
            raise ValueError(f"decay_iterations must be an integer, got {self.iterations!r}.")
        if self.iterations < 1:
            raise ValueError(f"decay_iterations must be >= 1, got {self.iterations}.")

    def __call__(self, iteration: int) -> float:
        return min(1.0, (iteration + 1) / self.iterations)


class AdmmState(NamedTuple):
    """Everything an ADMM run carries between iterations (a checkpointable pytree).

    Attributes:
        params: the current W.
        opt_state: the W-step optimizer's state.
        z: the projected copy Z (same structure as params).
        u: the scaled dual variable U.
        rho: the current penalty (scalar array).
        iteration: ADMM iterations completed (scalar int array).
        key: PRNG key for the next shuffles.
        metric: the penalty weights d, like params: one scalar per leaf for
            ``Fisher()``, one per weight for ``DiagFisher()``;
            None for the Euclidean metric.
    """

    params: PyTree
    opt_state: Any
    z: PyTree
    u: PyTree
    rho: jax.Array
    iteration: jax.Array
    key: jax.Array
    metric: PyTree = None


def _zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


@dataclasses.dataclass(frozen=True)
class Penalty:
    """The W-step's penalty gradient, ``g + rho d (W - Z + U)`` on prunable leaves.

    The gradient of the augmented Lagrangian's W-part (Zhang et al., ECCV
    2018, eq. 6), as a hashable ``grad_term`` for
    :func:`admmprune.training.run_epoch`; its arrays ``(Z, U, rho, d)``
    (``d`` None for the Euclidean metric) come as the term's arguments.
    """

    flags: tuple[bool, ...]

    def __call__(self, grads: PyTree, params: PyTree, args: Any) -> PyTree:
        z, u, rho, metric = args
        treedef = jax.tree.structure(params)
        g, w, zz, uu = (treedef.flatten_up_to(t) for t in (grads, params, z, u))
        d = treedef.flatten_up_to(metric) if metric is not None else [None] * len(g)
        out = [
            (gi + (rho if di is None else rho * di) * (wi - zi + ui)) if f else gi
            for gi, wi, zi, ui, di, f in zip(g, w, zz, uu, d, self.flags, strict=True)
        ]
        return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class ADMM:
    """ADMM pruning solver: a frozen configuration; :meth:`run` returns a result.

    Args:
        budget: the budget set S (any :class:`admmprune.Budget`).
        optimizer: the W-step's optax optimizer (any GradientTransformation).
        rho: the penalty: a positive float (constant) or a schedule
            ``iteration -> rho`` (e.g. :class:`GeometricRho`, or an optax
            schedule); when rho changes the scaled dual is rescaled.
            Default ``GeometricRho(1e-4, 1.15)``: with ``iterations=60`` and
            ``Finetune(epochs=20)``, the method as the recipes and benchmarks
            run it.
        iterations: maximum number of ADMM iterations.
        epochs_per_iteration: W-step epochs per iteration.
        tol: stop early when both relative residuals ``||W - Z|| / ||W||``
            and ``||Z - Z_prev|| / ||W||`` fall below it (None: never).
        metric: the norm of the splitting (:mod:`admmprune.metrics`):
            :class:`~admmprune.metrics.Euclidean` (default),
            :class:`~admmprune.metrics.Fisher` or
            :class:`~admmprune.metrics.DiagFisher`; the Z-step and the hard
            prune project in the same metric.
        budget_ramp: optional schedule ``iteration -> progress`` in [0, 1]:
            the Z-step of iteration k (0-based) projects onto
            ``budget.relax(budget_ramp(k))`` (e.g. :class:`BudgetRamp`,
            progressive ADMM); it must reach 1 by the last iteration. The
            hard prune always uses the target.
        finetune: the hard prune and masked retraining after the last
            iteration (:class:`admmprune.finetune.Finetune`; its optimizer
            defaults to ``optimizer``, its ``compensate`` refits the kept
            weights, e.g. :func:`admmprune.obs.compensator`).
        batch_size: minibatch size.
        divergence_factor: the run stops with a
            :class:`~admmprune.guards.DivergenceError` when an iteration's mean
            W-step loss exceeds this multiple of the larger of the starting
            network's loss and its projection's (None or 0: only a non-finite
            loss stops it).
        mesh: run the W-step and the retraining data-parallel over this
            ``jax.sharding.Mesh`` (its first axis splits every minibatch;
            params, Z and U are replicated and the Z-step projects the
            replicated copy): the same result as on one device up to float
            summation order. ``batch_size`` must be a multiple of its size.

    Example:
        >>> ADMM(ParamBudget(keep=0.02), optax.adam(1e-3), rho=GeometricRho(1e-4, 1.15),
        ...      iterations=60, finetune=Finetune(epochs=20))
    """

    budget: Budget
    optimizer: optax.GradientTransformation
    rho: float | Schedule = GeometricRho(1e-4, 1.15)
    iterations: int = 60
    epochs_per_iteration: int = 1
    tol: float | None = None
    metric: Metric = Euclidean()
    budget_ramp: Schedule | None = None
    finetune: Finetune = Finetune(epochs=20)
    batch_size: int = 128
    divergence_factor: float | None = DIVERGENCE_FACTOR
    mesh: jax.sharding.Mesh | None = None

    def __post_init__(self) -> None:
        check_budget(self.budget, "ADMM")
        check_factor(self.divergence_factor, "ADMM")
        if self.mesh is not None and self.batch_size % self.mesh.devices.size:
            raise ValueError(
                f"batch_size={self.batch_size} does not split over the mesh's "
                f"{self.mesh.devices.size} devices; use a multiple of {self.mesh.devices.size}."
            )
        if not callable(self.rho):
            GeometricRho(self.rho)  # validates a constant rho
        for name in ("iterations", "epochs_per_iteration"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")
        if self.budget_ramp is not None and self.budget_ramp(self.iterations - 1) < 1.0:
            raise ValueError(
                f"budget_ramp {self.budget_ramp!r} has not reached the target by the last of "
                f"iterations={self.iterations}: the Z-step would never project onto the "
                "budget before the hard prune; ramp over at most that many iterations."
            )
        if self.tol is not None and self.tol <= 0:
            raise ValueError(f"tol must be positive or None, got {self.tol}.")

    @property
    def epochs(self) -> int:
        """Total training epochs: W-steps plus retraining (at most; tol may stop early)."""
        return self.iterations * self.epochs_per_iteration + self.finetune.epochs

    def progress_at(self, iteration: int) -> float:
        """How far the Z-step budget of iteration ``iteration`` (0-based) is moved
        from dense (0) to the target (1); always 1 without ``budget_ramp``."""
        if self.budget_ramp is None:
            return 1.0
        return float(self.budget_ramp(iteration))

    def budget_at(self, iteration: int) -> Budget:
        """The budget of the Z-step of iteration ``iteration`` (0-based)."""
        t = self.progress_at(iteration)
        return self.budget if t >= 1.0 else self.budget.relax(t)

    def rho_at(self, iteration: int) -> float:
        """The penalty used in iteration ``iteration`` (0-based)."""
        return float(self.rho(iteration)) if callable(self.rho) else float(self.rho)

    # ---------------------------------------------------------------- pieces
    def init(self, params: PyTree, key: jax.Array, metric: PyTree = None) -> AdmmState:
        """Initial state: ``Z = Proj_S(W)`` (in the metric weights ``metric``; S
        relaxed by ``budget_ramp``), ``U = 0``, fresh optimizer state."""
        z = apply_masks(params, self.budget_at(-1).project(scaled(params, metric)).masks)
        return AdmmState(
            params=params,
            opt_state=self.optimizer.init(params),
            z=z,
            u=_zeros_like(params),
            rho=jnp.asarray(self.rho_at(0), jnp.float32),
            iteration=jnp.asarray(0, jnp.int32),
            key=key,
            metric=metric,
        )

    def metric_like(self, params: PyTree) -> PyTree | None:
        """A placeholder with the structure of :meth:`metric_weights`' result
        (zeros), e.g. for the template :func:`load_checkpoint` needs."""
        return self.metric.like(params)

    def metric_weights(
        self, params: PyTree, loss_fn: LossFn, data: PyTree, key: jax.Array
    ) -> PyTree | None:
        """The penalty weights d of the run's metric at ``params`` (None: Euclidean)."""
        return self.metric.weights(params, loss_fn, data, key, self.budget.prunable(params))

    def update(
        self, state: AdmmState, loss_fn: LossFn, data: PyTree
    ) -> tuple[AdmmState, dict[str, Any]]:
        """One ADMM iteration: W-step epochs, Z-step, U-step, rho update.

        Returns:
            The new state and the iteration's record: ``loss`` (mean training
            loss over the W-step), ``primal_residual`` ``||W - Z||``,
            ``dual_residual`` ``rho ||Z - Z_prev||``, their values relative to
            ``||W||``, ``rho`` (the penalty used), ``budget_progress`` (the
            Z-step budget's progress to the target, 1 without
            ``budget_ramp``), ``support_change`` (the fraction of prunable
            weights whose membership in Z's support changed) and the
            budget's figures for its projection (an energy budget: ``energy``,
            ``energy_fraction`` and the knapsack's ``projection_gap``).
        """
        flags = self.budget.prunable(state.params)
        params, opt_state, key = state.params, state.opt_state, state.key
        rho = state.rho
        losses, seconds = [], 0.0
        penalty = Penalty(tuple(flags))
        for _ in range(self.epochs_per_iteration):
            key, sub = jax.random.split(key)
            params, opt_state, stats = run_epoch(
                params,
                opt_state,
                data,
                sub,
                loss_fn=loss_fn,
                optimizer=self.optimizer,
                batch_size=self.batch_size,
                grad_term=penalty,
                term_args=(state.z, state.u, rho, state.metric),
                phase="admm",
                mesh=self.mesh,
            )
            losses.append(stats.loss)
            seconds += stats.seconds
        it = int(state.iteration)
        z_new, u_new, figures = _z_and_u_step(
            params, state.z, state.u, rho, self.budget_at(it), flags, state.metric
        )
        next_rho = self.rho_at(it + 1)
        scale = float(rho) / next_rho
        if scale != 1.0:
            u_new = jax.tree.map(lambda a: a * scale, u_new)
        new_state = AdmmState(
            params,
            opt_state,
            z_new,
            u_new,
            jnp.asarray(next_rho, jnp.float32),
            jnp.asarray(it + 1, jnp.int32),
            key,
            state.metric,
        )
        record = {
            "phase": "admm",
            "iteration": it + 1,
            "loss": sum(losses) / max(len(losses), 1),
            "rho": float(rho),
            "budget_progress": self.progress_at(it),
            **{k: float(v) for k, v in figures.items()},
            "seconds": seconds,  # the W-step epochs of this iteration
        }
        return new_state, record

    def hard_prune(self, state: AdmmState) -> tuple[PyTree, PyTree]:
        """``(Proj_S(W), mask)`` in the run's metric: what a hard prune now gives."""
        masks = self.budget.project(scaled(state.params, state.metric)).masks
        return apply_masks(state.params, masks), masks

    def converged(self, record: Mapping[str, Any]) -> bool:
        """Whether an iteration's relative residuals are both below ``tol`` (and its
        Z-step used the target budget: a ramping budget keeps Z near W)."""
        return (
            self.tol is not None
            and record.get("budget_progress", 1.0) >= 1.0  # not while the budget still ramps
            and record["primal_relative"] <= self.tol
            and record["dual_relative"] <= self.tol
        )

    # ------------------------------------------------------------------- run
    def run(
        self,
        params: PyTree,
        loss_fn: LossFn,
        data: PyTree,
        *,
        key: jax.Array,
        eval_fn: EvalFn | None = None,
        callback: Callback | None = None,
        state: AdmmState | None = None,
        history: list[dict[str, Any]] | None = None,
        on_iteration: Callable[[AdmmState, list[dict[str, Any]]], None] | None = None,
        checkpoint: RunCheckpoint | None = None,
    ) -> PruneResult:
        """Runs ADMM, the hard prune and masked retraining.

        Args:
            params: trained (dense) parameters, any pytree of arrays.
            loss_fn: ``loss_fn(params, batch) -> scalar``; jit-traceable.
            data: pytree of training arrays with a common leading axis,
                e.g. ``(x, y)``; minibatches are drawn from it.
            key: PRNG key (the run is deterministic given it; pass the same
                key when resuming).
            eval_fn: ``eval_fn(params) -> {"accuracy": ...}``, called after
                every ADMM iteration (on W, and prefixed ``pruned_`` on
                ``Proj_S(W)``, what a hard prune now would give), after the
                hard prune and after every retraining epoch.
            callback: called with every new history record as it is made.
            state: an :class:`AdmmState` to resume from (e.g. a checkpoint);
                ``params`` is then ignored.
            history: with ``state``, the records of the iterations already
                run (they carry the residuals the ``tol`` test needs).
            on_iteration: called with the state and the history after every
                ADMM iteration (e.g. to save a checkpoint).
            checkpoint: a :class:`~admmprune.checkpoint.RunCheckpoint`: the
                state and history are saved in its ``"admm"`` slot after every
                iteration and the retraining's in ``"retrain"`` after every
                epoch; a run that finds them there resumes (``state`` and
                ``history`` are then taken from it), bit for bit.

        Returns:
            A :class:`PruneResult`; ``state`` holds the final ADMM state.
        """
        start = time.perf_counter()
        # With a ``state`` to resume, ``params`` may be None: its W stands in for them.
        start_params = params if params is not None or state is None else state.params
        check_inputs(start_params, data, self.budget, "ADMM")
        check_batch_size(data, self.batch_size)
        if self.mesh is not None:  # laid out once; every W-step epoch then finds it in place
            data = place_on_mesh(self.mesh, data, None, self.batch_size)[0]
        history = list(history or [])

        def emit(record: dict[str, Any]) -> None:
            history.append(record)
            if callback is not None:
                callback(record)

        # The same split whether or not we resume, so a resumed run retrains identically.
        init_key, retrain_key = jax.random.split(key)
        slot = checkpoint.slot("admm") if checkpoint is not None else None
        saved = None
        if state is None and slot is not None and "admm" in checkpoint.phases():
            saved = slot.restore(self.init(params, init_key, self.metric_like(params)))
            if saved is not None:
                state, history = saved[0], list(saved[1]["history"])
        reference = None
        if state is None:
            metric_key = jax.random.fold_in(init_key, 1)
            metric = self.metric_weights(params, loss_fn, data, metric_key)
            state = self.init(params, init_key, metric)
            # Divergence is judged against both ends W is pulled between: the start and
            # its projection (the initial Z); a checkpoint keeps the figure for a resume.
            reference = reference_loss(loss_fn, (state.params, state.z), data, self.batch_size)
        elif saved is not None:
            reference = saved[1].get("reference")
        if reference is None:  # resumed from a bare state: its W and Z stand in
            reference = reference_loss(loss_fn, (state.params, state.z), data, self.batch_size)
        watch = LossWatch("ADMM", reference, self.divergence_factor)
        converged = any(self.converged(r) for r in history if r.get("phase") == "admm")
        while not converged and int(state.iteration) < self.iterations:
            state, record = self.update(state, loss_fn, data)
            watch(record["loss"], f"iteration {record['iteration']}")
            if eval_fn is not None:
                with_eval(record, state.params, eval_fn)
                hard = self.hard_prune(state)[0]
                with_eval(record, hard, eval_fn, prefix="pruned_")
            emit(record)
            converged = self.converged(record)
            if on_iteration is not None:
                on_iteration(state, history)
            if slot is not None:
                info = {"iteration": int(state.iteration), "history": history}
                slot.save(state, {**info, "reference": reference})

        _, masks = self.hard_prune(state)
        pruned, tail = self.finetune.run(
            state.params,
            masks,
            loss_fn,
            data,
            key=retrain_key,
            record={"phase": "prune", "iteration": int(state.iteration)},
            optimizer=self.optimizer,
            batch_size=self.batch_size,
            eval_fn=eval_fn,
            callback=callback,
            checkpoint=checkpoint.slot("retrain") if checkpoint is not None else None,
            mesh=self.mesh,
        )
        history.extend(tail)
        return finish(
            params=pruned,
            masks=masks,
            budget=self.budget,
            history=history,
            method="admm",
            start=start,
            epochs=int(state.iteration) * self.epochs_per_iteration + self.finetune.epochs,
            converged=converged if self.tol is not None else None,
            state=state,
        )


def _z_and_u_step(
    w: PyTree,
    z_prev: PyTree,
    u: PyTree,
    rho: jax.Array,
    budget: Budget,
    flags: list[bool],
    metric: PyTree = None,
) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
    """Z <- Proj_S(W + U) (in ``metric``), U <- U + W - Z, the residuals and the
    budget's figures for the projection."""
    treedef = jax.tree.structure(w)
    wl, zl, ul = (treedef.flatten_up_to(t) for t in (w, z_prev, u))
    v = jax.tree.unflatten(
        treedef, [wi + ui if f else wi for wi, ui, f in zip(wl, ul, flags, strict=True)]
    )
    projection = budget.project(scaled(v, metric))
    z = apply_masks(v, projection.masks)
    zl_new = treedef.flatten_up_to(z)
    u_new = jax.tree.unflatten(
        treedef,
        [ui + wi - zi if f else ui for ui, wi, zi, f in zip(ul, wl, zl_new, flags, strict=True)],
    )
    diff = jax.tree.map(jnp.subtract, w, z)
    step = jax.tree.map(jnp.subtract, z, z_prev)
    w_norm = jnp.sqrt(sq_norm(w, flags))
    primal = jnp.sqrt(sq_norm(diff, flags))
    dz = jnp.sqrt(sq_norm(step, flags))
    support = [
        jnp.sum((a != 0) != (b != 0)) for a, b, f in zip(zl_new, zl, flags, strict=True) if f
    ]
    total = sum(a.size for a, f in zip(wl, flags, strict=True) if f)
    return (
        z,
        u_new,
        {
            "primal_residual": primal,
            "dual_residual": rho * dz,
            "primal_relative": primal / jnp.maximum(w_norm, 1e-30),
            "dual_relative": dz / jnp.maximum(w_norm, 1e-30),
            "support_change": sum(support) / total,
            **projection.figures,
        },
    )
