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
retrained with that mask fixed; pruned weights stay exactly zero.

References:
    T. Zhang et al., "A Systematic DNN Weight Pruning Framework using
    Alternating Direction Method of Multipliers", ECCV 2018.
    S. Boyd et al., "Distributed Optimization and Statistical Learning via
    the Alternating Direction Method of Multipliers", FnT ML 2011.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admmprune._tree import PyTree, apply_masks, sq_norm
from admmprune.budgets import Budget
from admmprune.results import PruneResult, finish, with_eval
from admmprune.training import LossFn, check_batch_size, run_epoch, train

METRICS = ("euclidean", "fisher", "diag_fisher")
EvalFn = Callable[[PyTree], Mapping[str, float]]
Callback = Callable[[dict[str, Any]], None]
Compensate = Callable[[PyTree, PyTree], PyTree]


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
            ``metric="fisher"``, one per weight for ``metric="diag_fisher"``;
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
class ADMM:
    """ADMM pruning solver: a frozen configuration; :meth:`run` returns a result.

    Args:
        budget: the budget set S (e.g. ``ParamBudget(keep=0.02)``).
        optimizer: the W-step's optax optimizer (any GradientTransformation).
        rho: initial penalty.
        rho_growth: multiply rho by this after every iteration (1 = constant;
            1.1-2 is the usual geometric growth that makes W meet Z).
        rho_max: upper bound on rho.
        iterations: maximum number of ADMM iterations.
        epochs_per_iteration: W-step epochs per iteration.
        tol: stop early when both relative residuals ``||W - Z|| / ||W||``
            and ``||Z - Z_prev|| / ||W||`` fall below it (None: never).
        retrain_epochs: masked retraining epochs after the hard prune.
        retrain_optimizer: optimizer for retraining (default: ``optimizer``).
        batch_size: minibatch size.
        compensate: optional ``compensate(params, masks) -> params`` applied
            to the unpruned W at the hard prune instead of plain zeroing
            (e.g. :func:`admmprune.obs.compensator`, the OBS refit); its
            output is masked again, so it cannot revive pruned weights. The
            prune record then holds both accuracies (``zeroed_accuracy``).
        metric: the norm of the splitting. ``"euclidean"``: the penalty
            ``rho/2 ||W - Z + U||^2`` and the Euclidean projection.
            ``"fisher"``: a diagonal metric with one weight per layer,
            ``rho/2 sum_l d_l ||W_l - Z_l + U_l||^2``, with d_l the layer's
            mean empirical-Fisher diagonal ``E[(dL/dw)^2]`` at the initial
            weights (normalized to weight-average 1), fixed for the run. The
            Z-step projects in the same metric (the support of the Euclidean
            projection of ``sqrt(d_l) V``), and so does the hard prune. This
            is still ADMM (for the equivalent constraint
            ``D^(1/2) (W - Z) = 0``); it matters when a budget trades weights
            across layers at different prices (energy), where the Euclidean
            knapsack ranks by ``v^2 / c`` and ignores that a weight of an
            early convolution, reused at every position, moves the loss far
            more than its magnitude says (the OBD saliency ``h_ii w_i^2``,
            with the layer-averaged Fisher standing in for ``h_ii``).
            ``"diag_fisher"``: one weight per *weight*,
            ``d_i = F_ii + damp * mean_l(F)`` (F the empirical Fisher
            diagonal, damped by ``metric_damp`` times its layer mean so a
            weight whose sampled gradients vanish keeps a penalty), again
            normalized to average 1. The Z-step then keeps the weights of
            largest OBD saliency per unit cost, ``d_i v_i^2 / c_i`` (LeCun et
            al., "Optimal Brain Damage", NIPS 1990), instead of ``v_i^2 / c_i``.
        metric_examples: training examples whose per-example gradients
            estimate the Fisher diagonal.
        decay_iterations: progressive ADMM (Ye et al., "Progressive Weight
            Pruning of DNNs using ADMM", 2018): the Z-step of iteration k
            (1-based) projects onto ``budget.relax(min(1, k /
            decay_iterations))``, a budget moved from dense to the target
            over that many iterations (geometrically; see the budget's
            ``relax``; a layer or group whose target is 0 weights is emptied
            at once), so W is pulled toward a sparse set gradually and the
            loss, through the W-steps and the dual, has time to decide which
            weights survive before the full cut. 0 (default): the target
            from the first Z-step. The hard prune always uses the target.
        metric_damp: the damping of ``"diag_fisher"``, a fraction of each
            layer's mean Fisher diagonal.
        allocate: optional ``allocate(params) -> Budget``, called once with
            the dense params at the start of :meth:`run` (also when
            resuming: pass the dense params then too); the run then uses the
            budget it returns, a subset of ``budget`` -- e.g.
            :func:`admmprune.oneshot.obs_allocation`, per-layer counts from
            OBS loss curves.
    """

    budget: Budget
    optimizer: optax.GradientTransformation
    rho: float = 1e-3
    rho_growth: float = 1.0
    rho_max: float = math.inf
    iterations: int = 10
    epochs_per_iteration: int = 1
    tol: float | None = None
    retrain_epochs: int = 5
    retrain_optimizer: optax.GradientTransformation | None = None
    batch_size: int = 128
    compensate: Compensate | None = None
    metric: Literal["euclidean", "fisher", "diag_fisher"] = "euclidean"
    metric_examples: int = 1024
    metric_damp: float = 0.01
    decay_iterations: int = 0
    allocate: Callable[[PyTree], Budget] | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}.")
        if not (self.metric_damp >= 0 and math.isfinite(self.metric_damp)):
            raise ValueError(f"metric_damp must be >= 0 and finite, got {self.metric_damp}.")
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise ValueError(f"rho must be positive and finite, got {self.rho}.")
        if self.rho_growth < 1:
            raise ValueError(f"rho_growth must be >= 1 (1 = constant), got {self.rho_growth}.")
        if self.rho_max < self.rho:
            raise ValueError(f"rho_max={self.rho_max} is below rho={self.rho}.")
        if not isinstance(self.metric_examples, int) or self.metric_examples < 1:
            raise ValueError(
                f"metric_examples must be a positive integer, got {self.metric_examples!r}."
            )
        for name in ("iterations", "epochs_per_iteration", "retrain_epochs", "decay_iterations"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}.")
        if self.decay_iterations > self.iterations:
            raise ValueError(
                f"decay_iterations={self.decay_iterations} exceeds iterations={self.iterations}: "
                "the Z-step would never reach the target before the hard prune; use at most "
                f"{self.iterations}."
            )
        if self.tol is not None and self.tol <= 0:
            raise ValueError(f"tol must be positive or None, got {self.tol}.")

    @property
    def epochs(self) -> int:
        """Total training epochs: W-steps plus retraining (at most; tol may stop early)."""
        return self.iterations * self.epochs_per_iteration + self.retrain_epochs

    def progress_at(self, iteration: int) -> float:
        """How far the Z-step budget of iteration ``iteration`` (0-based) is moved
        from dense (0) to the target (1); always 1 without ``decay_iterations``."""
        if self.decay_iterations == 0:
            return 1.0
        return min(1.0, (iteration + 1) / self.decay_iterations)

    def budget_at(self, iteration: int) -> Budget:
        """The budget of the Z-step of iteration ``iteration`` (0-based)."""
        t = self.progress_at(iteration)
        return self.budget if t >= 1.0 else self.budget.relax(t)

    def rho_at(self, iteration: int) -> float:
        """The penalty used in iteration ``iteration`` (0-based)."""
        return min(self.rho * self.rho_growth**iteration, self.rho_max)

    # ---------------------------------------------------------------- pieces
    def init(self, params: PyTree, key: jax.Array, metric: PyTree = None) -> AdmmState:
        """Initial state: ``Z = Proj_S(W)`` (in ``metric``; S relaxed to dense with
        ``decay_iterations``), ``U = 0``, fresh optimizer state."""
        z = apply_masks(params, self.budget_at(-1).mask(_scaled(params, metric)))
        return AdmmState(
            params=params,
            opt_state=self.optimizer.init(params),
            z=z,
            u=_zeros_like(params),
            rho=jnp.asarray(self.rho, jnp.float32),
            iteration=jnp.asarray(0, jnp.int32),
            key=key,
            metric=metric,
        )

    def metric_like(self, params: PyTree) -> PyTree | None:
        """A placeholder with the structure of :meth:`fisher_metric`'s result
        (zeros), e.g. for the template :func:`load_checkpoint` needs."""
        if self.metric == "euclidean":
            return None
        if self.metric == "fisher":
            return jax.tree.map(lambda a: jnp.zeros((), jnp.float32), params)
        return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), params)

    def fisher_metric(
        self, params: PyTree, loss_fn: LossFn, data: PyTree, key: jax.Array
    ) -> PyTree | None:
        """The penalty weights d of the run's metric (None for Euclidean).

        From per-example gradients of ``metric_examples`` training examples
        drawn with ``key``, the empirical Fisher diagonal
        ``F_ii = E_x[(dL(x)/dw_i)^2]``. ``"fisher"``: d_l is its mean over
        layer l (a scalar per leaf). ``"diag_fisher"``: ``d_i = F_ii + damp
        mean_l(F)``, an array per leaf. Prunable leaves are normalized so the
        mean of d over all prunable weights is 1 (rho keeps its meaning);
        other leaves get 1.
        """
        if self.metric == "euclidean":
            return None
        flags = self.budget.prunable(params)
        n = jax.tree.leaves(data)[0].shape[0]
        chunk = min(64, self.metric_examples, n)
        m = (min(self.metric_examples, n) // chunk) * chunk
        idx = jax.random.permutation(key, n)[:m]
        sums = _fisher_sums(params, loss_fn, jax.tree.map(lambda a: a[idx], data), chunk)
        leaves, treedef = jax.tree.flatten(params)
        fisher = [s / m for s in sums]  # F_ii, shaped like each leaf
        if self.metric == "fisher":
            d = [jnp.mean(f) for f in fisher]
        else:
            d = [f + self.metric_damp * jnp.mean(f) for f in fisher]
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
            ``decay_iterations``) and ``support_change``
            (the fraction of prunable weights whose membership in Z's support
            changed). A budget with ``metrics`` adds its figures for Z (an
            :class:`~admmprune.energy.EnergyBudget`: ``energy`` and
            ``energy_fraction``) and one with ``project_with_stats`` the
            Z-step's ``projection_gap`` (relative knapsack gap bound).
        """
        flags = self.budget.prunable(state.params)
        params, opt_state, key = state.params, state.opt_state, state.key
        rho = state.rho
        losses, seconds = [], 0.0
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
                kind="admm",
                aux=(state.z, state.u, rho)
                if state.metric is None
                else (state.z, state.u, rho, state.metric),
                flags=tuple(flags),
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
        masks = self.budget.mask(_scaled(state.params, state.metric))
        return apply_masks(state.params, masks), masks

    def converged(self, record: Mapping[str, Any]) -> bool:
        """Whether an iteration's relative residuals are both below ``tol`` (and its
        Z-step used the target budget: a decaying budget keeps Z near W)."""
        return (
            self.tol is not None
            and record.get("budget_progress", 1.0) >= 1.0  # not while the budget still decays
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
                ``params`` is then ignored (but for ``allocate``).
            history: with ``state``, the records of the iterations already
                run (they carry the residuals the ``tol`` test needs).
            on_iteration: called with the state and the history after every
                ADMM iteration (e.g. to save a checkpoint).

        Returns:
            A :class:`PruneResult`; ``state`` holds the final ADMM state.
        """
        if self.allocate is not None:
            if params is None:
                raise ValueError(
                    "ADMM(allocate=...) computes its budget from the dense params: pass them "
                    "to run(), also when resuming from a state."
                )
            begin = time.perf_counter()
            solver = dataclasses.replace(self, budget=self.allocate(params), allocate=None)
            result = solver.run(
                params, loss_fn, data, key=key, eval_fn=eval_fn, callback=callback,
                state=state, history=history, on_iteration=on_iteration,
            )  # fmt: skip
            # The allocation is part of the solver's cost (the OBS curves, the MILP).
            return dataclasses.replace(result, wall_seconds=time.perf_counter() - begin)
        start = time.perf_counter()
        check_batch_size(data, self.batch_size)
        history = list(history or [])

        def emit(record: dict[str, Any]) -> None:
            history.append(record)
            if callback is not None:
                callback(record)

        # The same split whether or not we resume, so a resumed run retrains identically.
        init_key, retrain_key = jax.random.split(key)
        if state is None:
            metric_key = jax.random.fold_in(init_key, 1)
            metric = self.fisher_metric(params, loss_fn, data, metric_key)
            state = self.init(params, init_key, metric)
        converged = any(self.converged(r) for r in history if r.get("phase") == "admm")
        while not converged and int(state.iteration) < self.iterations:
            state, record = self.update(state, loss_fn, data)
            if eval_fn is not None:
                with_eval(record, state.params, eval_fn)
                hard = self.hard_prune(state)[0]
                with_eval(record, hard, eval_fn, prefix="pruned_")
            emit(record)
            converged = self.converged(record)
            if on_iteration is not None:
                on_iteration(state, history)

        pruned, masks = self.hard_prune(state)
        record: dict[str, Any] = {"phase": "prune", "iteration": int(state.iteration)}
        if self.compensate is not None:
            with_eval(record, pruned, eval_fn, prefix="zeroed_")
            pruned = apply_masks(self.compensate(state.params, masks), masks)
        emit(with_eval(record, pruned, eval_fn))

        pruned, retrain_history = train(
            pruned,
            loss_fn,
            data,
            optimizer=self.retrain_optimizer or self.optimizer,
            epochs=self.retrain_epochs,
            batch_size=self.batch_size,
            key=retrain_key,
            masks=masks,
            eval_fn=eval_fn,
            callback=callback,
            phase="retrain",
        )
        history.extend(retrain_history)
        return finish(
            params=pruned,
            masks=masks,
            budget=self.budget,
            history=history,
            method="admm",
            start=start,
            epochs=int(state.iteration) * self.epochs_per_iteration + self.retrain_epochs,
            converged=converged if self.tol is not None else None,
            state=state,
        )


def _scaled(params: PyTree, metric: PyTree) -> PyTree:
    """``sqrt(d_l) W_l``: the Euclidean projection of this has the support of the
    projection of W in the metric ``sum_l d_l ||.||^2`` (identity when None)."""
    if metric is None:
        return params
    return jax.tree.map(lambda a, d: a * jnp.sqrt(d).astype(a.dtype), params, metric)


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk"))
def _fisher_sums(params: PyTree, loss_fn: LossFn, batch: PyTree, chunk: int) -> list[jax.Array]:
    """Per leaf, the sum over examples of squared per-example gradients, entrywise.

    ``batch`` holds a multiple of ``chunk`` examples; per-example gradients
    are formed ``chunk`` at a time (vmap inside a scan), squared and summed
    per chunk, accumulated across chunks in float32.
    """

    def body(total: list[jax.Array], part: PyTree) -> tuple[list[jax.Array], None]:
        g = jax.vmap(lambda ex: jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[None], ex)))(
            part
        )
        sq = [jnp.sum(x * x, axis=0) for x in jax.tree.leaves(g)]
        return [t + s for t, s in zip(total, sq, strict=True)], None

    parts = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), batch)
    init = [jnp.zeros(leaf.shape, jnp.float32) for leaf in jax.tree.leaves(params)]
    total, _ = jax.lax.scan(body, init, parts)
    return total


def _z_and_u_step(
    w: PyTree,
    z_prev: PyTree,
    u: PyTree,
    rho: jax.Array,
    budget: Budget,
    flags: list[bool],
    metric: PyTree = None,
) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
    """Z <- Proj_S(W + U) (in ``metric``), U <- U + W - Z, and the residuals."""
    treedef = jax.tree.structure(w)
    wl, zl, ul = (treedef.flatten_up_to(t) for t in (w, z_prev, u))
    v = jax.tree.unflatten(
        treedef, [wi + ui if f else wi for wi, ui, f in zip(wl, ul, flags, strict=True)]
    )
    if hasattr(budget, "project_with_stats"):  # a knapsack: also report its optimality gap
        masks, stats = budget.project_with_stats(_scaled(v, metric))
        extra = {"projection_gap": stats.relative_gap}
    else:
        masks, extra = budget.mask(_scaled(v, metric)), {}
    z = apply_masks(v, masks)
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
    figures = {
        "primal_residual": primal,
        "dual_residual": rho * dz,
        "primal_relative": primal / jnp.maximum(w_norm, 1e-30),
        "dual_relative": dz / jnp.maximum(w_norm, 1e-30),
        "support_change": sum(support) / total,
        **extra,
    }
    if hasattr(budget, "metrics"):  # e.g. the energy of Z
        figures.update(budget.metrics(z))
    return z, u_new, figures
