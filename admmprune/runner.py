"""Runs a recipe end to end: data, dense model, pruning solver, report files.

``solve(recipe, out_dir)`` writes into ``out_dir``:

* ``params.npz``: the pruned parameters, one array per leaf keyed by its
  pytree path joined with ``/`` (``fc1/kernel``);
* ``report.json``: the problem, method, budget, weight counts, test accuracy
  (pruned and dense), the energy (``energy``: dense, pruned, fraction and per
  layer, under the recipe's ``[energy]`` model, whatever the budget), epochs,
  wall time, per-layer table, history;
* ``checkpoint.npz`` while the run works (the state of dense training, ADMM
  and retraining after every epoch or iteration, in one atomic file;
  ``resume=True`` continues from it; deleted once the run has finished);
* plots, when matplotlib is installed (``pip install admmprune[plots]``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import admmprune
from admmprune.admm import BudgetRamp, GeometricRho
from admmprune.budgets import Budget, BudgetError
from admmprune.checkpoint import (
    CheckpointError,
    RunCheckpoint,
    Slot,
    load_params,
    read_meta,
    save_params,
)
from admmprune.data import cache_dir, load_mnist, synthetic_classification
from admmprune.metrics import METRICS
from admmprune.models import accuracy, cross_entropy_loss, init_model
from admmprune.recipes import Recipe, RecipeError, make_optimizer, retrain_learning_rate
from admmprune.results import PruneResult
from admmprune.training import Callback


def load_data(recipe: Recipe) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """The recipe's (train, test) arrays: MNIST (optionally a leading slice) or synthetic."""
    d, seed = recipe.data, recipe.problem["seed"]
    if ":" in recipe.problem["data"]:
        train, test = user_data(recipe)
    elif recipe.problem["data"] == "synthetic":
        # One draw split in two, so the same teacher labels train and test.
        both = synthetic_classification(
            d["synthetic_train"] + d["synthetic_test"], image=True, classes=10, seed=seed
        )
        n = d["synthetic_train"]
        train = (both.x[:n], both.y[:n])
        test = (both.x[n:], both.y[n:])
    elif recipe.problem["data"] == "fashion_mnist":
        from admmprune.data import load_fashion_mnist

        fashion = load_fashion_mnist(idx_dir=d["idx_dir"] or None, download=True)
        train, test = tuple(fashion.train), tuple(fashion.test)
    else:
        mnist = load_mnist(idx_dir=d["idx_dir"] or None, download=True)
        train, test = tuple(mnist.train), tuple(mnist.test)
    if d["train_subset"]:
        train = tuple(a[: d["train_subset"]] for a in train)
    if d["test_subset"]:
        test = tuple(a[: d["test_subset"]] for a in test)
    return tuple(map(jnp.asarray, train)), tuple(map(jnp.asarray, test))


def user_data(recipe: Recipe) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """A user's loader (``problem.data = "pkg.mod:load"``), called with no arguments.

    It returns ``((x_train, y_train), (x_test, y_test))``: inputs shaped
    ``(n, *input_shape)``, integer class labels shaped ``(n,)``.

    Raises:
        DataError: naming what the loader returned that does not fit.
    """
    from admmprune.data import DataError
    from admmprune.models import ModelError, import_object

    path = recipe.problem["data"]
    try:
        loader = import_object(path, "problem.data")
    except ModelError as e:
        raise DataError(str(e)) from None
    got = loader()
    try:
        (xt, yt), (xs, ys) = got
    except (TypeError, ValueError):
        raise DataError(
            f"problem.data: {path}() returned a {type(got).__name__}; it must return "
            "((x_train, y_train), (x_test, y_test))."
        ) from None
    shape = recipe.input_shape
    for split, x, y in (("train", xt, yt), ("test", xs, ys)):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape[1:] != shape:
            raise DataError(
                f"problem.data: {path}()'s {split} inputs have shape {x.shape}, but "
                f"problem.input_shape is {list(shape)}: each example must be {list(shape)}."
            )
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"problem.data: {path}()'s {split} labels have shape {y.shape} and dtype "
                f"{y.dtype}; they must be {x.shape[0]} integer class labels."
            )
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DataError(
                f"problem.data: {path}()'s {split} inputs hold "
                f"{int((~np.isfinite(x)).sum())} non-finite values; clean them first."
            )
    return (np.asarray(xt, np.float32), np.asarray(yt)), (
        np.asarray(xs, np.float32),
        np.asarray(ys),
    )


def dense_cache_path(recipe: Recipe, train: tuple[Any, Any] | None = None) -> Path:
    """Where the recipe's dense model is cached (keyed by a hash of its settings; for a
    user's loader also of the training arrays it returned, so new data is a new key)."""
    label = recipe.problem["model"].replace(":", "-").replace("/", "-")
    key = recipe.dense_key()
    if train is not None and ":" in recipe.problem["data"]:
        import hashlib

        digest = hashlib.sha256(key.encode())
        for a in train:
            digest.update(np.ascontiguousarray(np.asarray(a)).tobytes())
        key = digest.hexdigest()[:16]
    return cache_dir() / "dense" / f"{label}-{key}.npz"


def dense_params(
    recipe: Recipe,
    train: tuple[jax.Array, jax.Array],
    callback: Callback | None = None,
    checkpoint: Slot | None = None,
) -> tuple[Any, Callable, dict[str, Any]]:
    """Trains the dense model, or loads it from the cache keyed by its settings.

    ``checkpoint`` (a :class:`~admmprune.checkpoint.Slot`) saves the training
    after every epoch and resumes it. Returns ``(params, apply, info)``;
    ``info`` says whether it was cached and, when trained, the mean epoch time.
    """
    params, apply = init_model(recipe.problem["model"], seed=recipe.problem["seed"])
    if recipe.problem["params"]:  # the user's trained network: no dense training
        given = load_params(recipe.problem["params"], params)
        return given, apply, {"cached": False, "given": recipe.problem["params"]}
    dense = recipe.dense
    path = dense_cache_path(recipe, train)
    if dense["cache"] and path.exists():
        return load_params(path, params), apply, {"cached": True, "cache_file": str(path)}
    opt = make_optimizer(dense["optimizer"], dense["learning_rate"])
    params, history = admmprune.train(
        params,
        cross_entropy_loss(apply),
        train,
        optimizer=opt,
        epochs=dense["epochs"],
        batch_size=dense["batch_size"],
        key=jax.random.key(recipe.problem["seed"]),
        callback=callback,
        phase="dense",
        divergence_factor=dense["divergence_factor"] or None,
        checkpoint=checkpoint,
    )
    params = calibrator(recipe, train)(params)
    if dense["cache"]:
        save_params(path, params)
    seconds = [r["seconds"] for r in history]
    return params, apply, {"cached": False, "epoch_seconds": seconds}


def calibrator(recipe: Recipe, train: tuple[jax.Array, jax.Array]) -> Callable[[Any], Any]:
    """``f(params)``: the params with BatchNorm statistics measured on 2,000 training inputs.

    The identity for a model without BatchNorm. Statistics are measured, not
    trained (:func:`admmprune.nnx.calibrate_batch_stats`): after dense
    training, before every evaluation, and on the final pruned network.
    """
    from admmprune.nnx import batch_stats_calibrator, has_batch_stats

    model = _network(recipe)
    if not has_batch_stats(model):
        return lambda p: p
    n = int(train[0].shape[0])
    pick = jax.random.permutation(jax.random.key(recipe.problem["seed"] + 3), n)[: min(2000, n)]
    x = train[0][pick]
    calibrate = batch_stats_calibrator(model)
    return lambda p: calibrate(p, x)


def evaluator(recipe: Recipe) -> Callable[..., Any]:
    """The inference-mode apply (BatchNorm on its statistics) of the recipe's model."""
    from admmprune.nnx import split_nnx

    return split_nnx(_network(recipe), train=False)[1]


def calibration_set(recipe: Recipe, train: tuple[jax.Array, jax.Array]) -> jax.Array:
    """The training inputs OBS uses for its Hessians: a seeded random subset."""
    n = int(train[0].shape[0])
    key = jax.random.key(recipe.problem["seed"] + 2)
    pick = jax.random.permutation(key, n)[: min(recipe.solver["calibration_examples"], n)]
    return train[0][pick]


def make_solver(
    recipe: Recipe, steps_per_epoch: int, train: tuple[jax.Array, jax.Array] | None = None
) -> Any:
    """The recipe's solver: ADMM, MagnitudePrune, IterativeMagnitudePrune, ProjectedSGD
    or OneShotPrune.

    ``train`` gives ADMM's OBS hard prune its calibration inputs; without it
    (validation) the solver is built without compensation. ADMM's layer
    allocation (``layer_allocation = "obs"``) is not part of the solver: see
    :func:`allocator`.
    """
    s = recipe.solver
    budget = recipe.budget_object()
    factor = s["divergence_factor"] or None
    phase_epochs = (
        s["epochs_per_round"] if recipe.method == "iterative_magnitude" else s["retrain_epochs"]
    )
    retrain = make_optimizer(
        s["optimizer"], retrain_learning_rate(recipe, phase_epochs, steps_per_epoch)
    )
    if recipe.method == "oneshot":
        from admmprune.oneshot import OneShotPrune

        return OneShotPrune(
            budget=budget,
            model=_network(recipe),
            method=s["pruner"],
            allocation=s["layer_allocation"],
            calibration_examples=s["calibration_examples"],
            damp=s["damp"],
            block=s["block"],
            curve_points=s["curve_points"],
            fisher_block=s["fisher_block"],
            fisher_damp=s["fisher_damp"],
            fisher_steps=s["fisher_steps"],
            fisher_examples=s["fisher_examples"],
            nm=tuple(s["nm"]) if s["nm"] else None,
            finetune=admmprune.Finetune(
                epochs=s["retrain_epochs"],
                optimizer=retrain if s["retrain_epochs"] else None,
                divergence_factor=factor,
            ),
            batch_size=s["batch_size"],
        )
    if recipe.method == "projected_sgd":
        return admmprune.ProjectedSGD(
            budget=budget,
            optimizer=make_optimizer(s["optimizer"], s["learning_rate"]),
            projected_epochs=s["projected_epochs"],
            project_every=s["project_every"],
            decay_epochs=s["decay_epochs"] or None,
            finetune=admmprune.Finetune(
                divergence_factor=factor, epochs=s["retrain_epochs"], optimizer=retrain
            ),
            batch_size=s["batch_size"],
        )
    if recipe.method == "admm":
        if s["decay_iterations"] > s["iterations"]:
            raise ValueError(
                f"decay_iterations={s['decay_iterations']} exceeds iterations={s['iterations']}: "
                "the Z-step would never reach the target before the hard prune; use at most "
                f"{s['iterations']}."
            )
        return admmprune.ADMM(
            budget=budget,
            optimizer=make_optimizer(s["optimizer"], s["learning_rate"]),
            rho=GeometricRho(
                s["rho"], s["rho_growth"], math.inf if s["rho_max"] is None else s["rho_max"]
            ),
            iterations=s["iterations"],
            epochs_per_iteration=s["epochs_per_iteration"],
            tol=s["tol"] or None,
            metric=METRICS[s["metric"]](),
            budget_ramp=BudgetRamp(s["decay_iterations"]) if s["decay_iterations"] else None,
            finetune=admmprune.Finetune(
                epochs=s["retrain_epochs"],
                optimizer=retrain,
                compensate=_compensator(recipe, train),
                divergence_factor=factor,
            ),
            batch_size=s["batch_size"],
            divergence_factor=factor,
            mesh=data_mesh(s["devices"]),
        )
    if recipe.method in ("l1_filter", "slimming", "structured_obs"):
        from admmprune.structured import StructuredBudget
        from admmprune.structured_baselines import L1FilterPrune, NetworkSlimming, StructuredOBS

        if not isinstance(budget, StructuredBudget) or budget.describe().get("units") == "branches":
            raise ValueError(
                f'method "{recipe.method}" ranks channels: it takes [budget] type = "channels" '
                'or "macs" (with units = "channels").'
            )
        finetune = admmprune.Finetune(divergence_factor=factor, epochs=s["retrain_epochs"])
        if recipe.method == "structured_obs":
            return StructuredOBS(
                budget,
                _network(recipe),
                retrain,
                calibration_examples=s["calibration_examples"],
                damp=s["damp"],
                finetune=finetune,
                batch_size=s["batch_size"],
            )
        if recipe.method == "l1_filter":
            return L1FilterPrune(budget, retrain, finetune, s["batch_size"])
        return NetworkSlimming(
            budget,
            make_optimizer(s["optimizer"], s["retrain_learning_rate"]),
            sparsity_epochs=s["sparsity_epochs"],
            l1=s["l1"],
            finetune=finetune,
            batch_size=s["batch_size"],
        )
    if recipe.method == "magnitude":
        return admmprune.MagnitudePrune(
            budget=budget,
            optimizer=retrain,
            finetune=admmprune.Finetune(divergence_factor=factor, epochs=s["retrain_epochs"]),
            batch_size=s["batch_size"],
        )
    return admmprune.IterativeMagnitudePrune(
        budget=budget,
        optimizer=retrain,
        rounds=s["rounds"],
        epochs_per_round=s["epochs_per_round"],
        batch_size=s["batch_size"],
    )


def data_mesh(devices: int) -> jax.sharding.Mesh | None:
    """A one-axis ``("batch",)`` mesh over the first ``devices`` devices (-1: all; 0 or 1:
    None, one device). Many hosts: ``jax.distributed.initialize()`` first on each."""
    available = jax.devices()
    n = len(available) if devices == -1 else devices
    if n <= 1:
        return None
    if n > len(available):
        raise ValueError(
            f"devices={n}, but JAX sees {len(available)} ({available[0].platform}); use at most "
            f"{len(available)}, or -1 for all."
        )
    return jax.sharding.Mesh(np.array(available[:n]), ("batch",))


def allocator(recipe: Recipe, budget: Budget, train: tuple[jax.Array, jax.Array]) -> Any:
    """ADMM's layer allocation (``layer_allocation = "obs"``), or None.

    ``allocator(...)(dense_params)`` is the budget narrowed to per-layer counts
    from the layers' OBS loss curves (:func:`admmprune.obs_allocation`); the
    solver then runs on it.
    """
    if recipe.method != "admm" or recipe.solver["layer_allocation"] != "obs":
        return None
    from admmprune.oneshot import obs_allocation

    return obs_allocation(
        budget,
        _network(recipe),
        calibration_set(recipe, train),
        damp=recipe.solver["damp"],
        curve_points=recipe.solver["curve_points"],
    )


def _compensator(recipe: Recipe, train: tuple[jax.Array, jax.Array] | None) -> Any:
    if recipe.solver["hard_prune"] != "obs" or train is None:
        return None
    from admmprune.obs import compensator

    return compensator(_network(recipe), calibration_set(recipe, train), damp=recipe.solver["damp"])


def _network(recipe: Recipe) -> Any:
    """The recipe's nnx model (its layer shapes and call order, for calibration inputs)."""
    return recipe.network()


def validate(recipe: Recipe) -> None:
    """Everything that can be checked before any work: the budget and the solver settings.

    Raises:
        RecipeError: naming the key to change.
        BudgetError: for a budget no network can meet, saying what would be feasible.
    """
    params, _ = init_model(recipe.problem["model"], seed=recipe.problem["seed"])
    recipe.energy_model()  # every report states the energy: the [energy] section must build
    budget = recipe.budget_object()
    budget.check(params)  # names and sizes agree with the network, the budget can be met
    if recipe.method in ("admm", "oneshot") and recipe.solver["layer_allocation"] == "obs":
        try:
            budget.pricing(params)
        except BudgetError:
            raise RecipeError(
                'solver.layer_allocation = "obs" divides one global budget among the layers; '
                "give [budget] keep= or count= (allocation global) or an energy budget, or "
                "drop it."
            ) from None
    if recipe.method == "oneshot" and recipe.solver["pruner"] == "global_obs":
        try:
            per_weight = budget.pricing(params).per_weight
        except BudgetError as e:
            raise RecipeError(f"[solver]: global_obs: {e}") from None
        if not per_weight:
            raise RecipeError(
                "[solver]: global_obs takes a parameter budget (one kept count over all "
                "layers); for an energy budget use exact_obs or fast_obs with "
                'layer_allocation = "obs".'
            )
    try:
        make_solver(recipe, steps_per_epoch=1)
    except ValueError as e:
        raise RecipeError(f"[solver]: {e}") from None


def check_recipe(recipe: Recipe) -> dict[str, Any]:
    """Everything ``solve`` would check, without training: the settings and budget
    (:func:`validate`), the data (loaded, shapes and values checked), the model on one
    example, the starting params. Returns a summary for ``admmprune validate``.

    Raises:
        RecipeError, BudgetError, DataError, CheckpointError, InputError: what is wrong.
    """
    from admmprune.data import DataError
    from admmprune.guards import check_data, check_params

    validate(recipe)
    train, test = load_data(recipe)
    check_batch_sizes(recipe, int(train[0].shape[0]))
    check_data(train, "training data")
    check_data(test, "test data")
    if recipe.problem["params"]:
        params, apply, _ = dense_params(recipe, train)
        check_params(params, f"problem.params {recipe.problem['params']}")
    else:
        params, apply = init_model(recipe.problem["model"], seed=recipe.problem["seed"])
    try:
        logits = jax.eval_shape(apply, params, train[0][:1])
    except Exception as e:  # the model cannot take the data: say which shapes met
        raise DataError(
            f"the model cannot take inputs shaped {tuple(train[0].shape[1:])} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); check problem.input_shape "
            "and the data."
        ) from None
    classes = int(logits.shape[-1]) if logits.ndim == 2 else 0
    top = int(max(int(train[1].max()), int(test[1].max())))
    if logits.ndim != 2 or top >= classes:
        raise DataError(
            f"the model maps one example to shape {tuple(logits.shape)}, but the labels run to "
            f"{top}: it must output (batch, classes) logits with classes > {top}."
        )
    budget = recipe.budget_object()
    flags = budget.prunable(params)
    leaves = jax.tree.leaves(params)
    return {
        "problem": recipe.name,
        "model": recipe.problem["model"],
        "parameters": int(sum(np.size(a) for a in leaves)),
        "prunable_weights": int(sum(np.size(a) for a, f in zip(leaves, flags, strict=True) if f)),
        "train_examples": int(train[0].shape[0]),
        "test_examples": int(test[0].shape[0]),
        "input_shape": list(train[0].shape[1:]),
        "classes": classes,
        "method": recipe.method,
        "budget": budget.describe(),
        "start": "given params" if recipe.problem["params"] else "dense training",
    }


def check_batch_sizes(recipe: Recipe, train_examples: int) -> None:
    """Both batch sizes fit the training set (checked once the data is loaded)."""
    for section in ("dense", "solver"):
        bs = getattr(recipe, section)["batch_size"]
        if bs > train_examples:
            raise RecipeError(
                f"{section}.batch_size: {bs} exceeds the {train_examples} training "
                f"examples; use at most {train_examples}."
            )


def solve(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    callback: Callback | None = None,
    resume: bool = False,
    overwrite: bool = False,
    plots: bool = True,
    keep_checkpoint: bool = False,
) -> dict[str, Any]:
    """Runs ``recipe`` and writes ``params.npz`` and ``report.json`` into ``out_dir``.

    The run's state is saved in ``out_dir/checkpoint.npz`` after every dense
    epoch, ADMM iteration and retraining epoch (one file, written atomically:
    :class:`~admmprune.checkpoint.RunCheckpoint`). ``resume=True`` continues
    from it -- bit for bit the run that was stopped -- and refuses one that
    another recipe wrote or a directory without one; without ``resume`` a
    directory that holds a checkpoint is refused unless ``overwrite=True``.
    After a successful run the checkpoint is deleted, unless
    ``keep_checkpoint``. Returns the report (``report.json``'s content).

    Raises:
        CheckpointError: the directory question above, or an unreadable checkpoint.
        DivergenceError: the run diverged; the last good checkpoint is kept.
    """
    try:
        return _solve(recipe, Path(out_dir), callback, resume, overwrite, plots, keep_checkpoint)
    finally:
        # A run's compiled functions are of no use to the next one, and each XLA:CPU
        # executable keeps memory mappings alive: a benchmark suite of many runs in
        # one process would otherwise pass vm.max_map_count and crash inside XLA.
        jax.clear_caches()


def describe_checkpoint(path: Path) -> str:
    """What a checkpoint holds, in words: ``"ADMM iteration 12 of the run"``."""
    phases = read_meta(path)["phases"]
    parts = []
    for name in ("dense", "admm", "retrain"):
        if name in phases:
            info = phases[name]
            step = (
                f"iteration {info['iteration']}"
                if "iteration" in info
                else f"epoch {info['epoch']}"
            )
            parts.append(f"{name} {step}")
    return ", ".join(parts) or "no finished step"


def open_checkpoint(recipe: Recipe, out: Path, resume: bool, overwrite: bool) -> RunCheckpoint:
    """The run's checkpoint: read to resume, or a new one (see :func:`solve`).

    Raises:
        CheckpointError: ``out`` is a file; ``resume`` without a checkpoint;
            a checkpoint there without ``resume`` or ``overwrite``; an
            unreadable one, or another recipe's.
    """
    if out.exists() and not out.is_dir():
        raise CheckpointError(
            f"--out {out} is a file, not a directory; name a directory (it is created)."
        )
    path = out / "checkpoint.npz"
    if resume and overwrite:
        raise CheckpointError("--resume continues a checkpoint, --overwrite discards it: pick one.")
    if resume:
        if not path.exists():
            raise CheckpointError(
                f"--resume: {out} holds no checkpoint.npz to resume; drop --resume to start "
                "the run afresh there."
            )
        return RunCheckpoint.open(path, recipe.fingerprint())
    if path.exists() and not overwrite:
        try:
            held = describe_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"{e} (or pass --overwrite)") from None
        raise CheckpointError(
            f"{out} holds the checkpoint of another run ({held}); pass --resume to continue it, "
            "--overwrite to discard it, or another --out."
        )
    if overwrite:  # discarded now: a run that fails early must not point at another's state
        path.unlink(missing_ok=True)
    return RunCheckpoint(path, recipe.fingerprint())


def _solve(
    recipe: Recipe,
    out: Path,
    callback: Callback | None,
    resume: bool,
    overwrite: bool,
    plots: bool,
    keep_checkpoint: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    checkpoint = open_checkpoint(recipe, out, resume, overwrite)  # before any work
    validate(recipe)
    train, test = load_data(recipe)
    check_batch_sizes(recipe, int(train[0].shape[0]))
    out.mkdir(parents=True, exist_ok=True)
    # A report marks a finished run: an earlier one's must not sit beside this
    # run's params while it works (a benchmark would take them for finished).
    (out / "report.json").unlink(missing_ok=True)
    (out / "checkpoint.json").unlink(missing_ok=True)  # the side file of older versions
    resumed_from = checkpoint.phases()
    params, apply, dense_info = dense_params(recipe, train, callback, checkpoint.slot("dense"))
    loss_fn = cross_entropy_loss(apply)
    calibrate = calibrator(recipe, train)
    infer = evaluator(recipe)

    def evaluate(p: Any) -> dict[str, float]:
        return {"accuracy": accuracy(infer, calibrate(p), *test)}

    dense_acc = evaluate(params)["accuracy"]
    steps = train[0].shape[0] // recipe.solver["batch_size"]
    solver = make_solver(recipe, steps, train)
    allocation_seconds = 0.0
    allocate = allocator(recipe, solver.budget, train)
    if allocate is not None:  # from the dense params, also when resuming (it is deterministic)
        begin = time.perf_counter()
        solver = dataclasses.replace(solver, budget=allocate(params))
        allocation_seconds = time.perf_counter() - begin
    key = jax.random.key(recipe.problem["seed"] + 1)
    # Every solver but IMP checkpoints its retraining (ADMM also its iterations).
    resumable = recipe.method != "iterative_magnitude"
    extra: dict[str, Any] = {"checkpoint": checkpoint} if resumable else {}
    result: PruneResult = solver.run(
        params, loss_fn, train, key=key, eval_fn=evaluate, callback=callback, **extra
    )
    # The allocation is part of the solver's cost (the OBS curves, the MILP).
    result = dataclasses.replace(
        result,
        params=calibrate(result.params),
        wall_seconds=result.wall_seconds + allocation_seconds,
    )
    save_params(out / "params.npz", result.params)
    report = make_report(
        recipe,
        result,
        dense_acc,
        evaluate(result.params)["accuracy"],
        dense_info,
        time.perf_counter() - start,
    )
    report["energy"] = recipe.energy_model().breakdown(result.params)
    compact_info = export_compact(
        recipe, solver.budget, params, result, out, tuple(test[0].shape[1:])
    )
    if compact_info is not None:
        report["compact"] = compact_info
    if resumed_from:
        report["resumed_from"] = resumed_from_summary(resumed_from)
        if "admm" in resumed_from:
            report["resumed_from_iteration"] = resumed_from["admm"]["iteration"]
    written = out / "report.json.partial"
    written.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    written.replace(out / "report.json")  # last and atomic: a report means finished
    if not keep_checkpoint:
        checkpoint.path.unlink(missing_ok=True)
    if plots:
        report["plots"] = save_plots(report, out)
    return report


def resumed_from_summary(phases: dict[str, dict[str, Any]]) -> dict[str, int]:
    """``{"dense_epoch": 20, "admm_iteration": 12}``: where a resumed run picked up."""
    out = {}
    for name, info in phases.items():
        for step in ("iteration", "epoch"):
            if step in info:
                out[f"{name}_{step}"] = int(info[step])
    return out


def export_compact(
    recipe: Recipe,
    budget: Budget,
    dense: Any,
    result: PruneResult,
    out: Path,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, Any] | None:
    """For a channel or branch budget: the compact network, saved and timed beside the dense.

    Writes ``compact.npz``, ``compact.json`` and ``compact.jaxexport``
    (:func:`admmprune.compact.save_compact`) and returns the report's
    ``compact`` block: parameter counts and MACs of both (the compact MACs
    counted on the compact model by tracing it again) and their inference
    times at batch 256 and 1, measured side by side, with the library's
    im2col convolution (``latency.batch_<n>``) and XLA's (``latency.by_impl``),
    and the faster form of each against the faster of the other (``latency.best``).
    """
    from admmprune.compact import compact, compare_latency, save_compact
    from admmprune.groups import derive, kept_counts
    from admmprune.nnx import split_nnx
    from admmprune.structured import StructuredBudget

    if not isinstance(budget, StructuredBudget):
        return None
    model = _network(recipe)
    masks = jax.tree.map(lambda x: x != 0, result.params)
    small, small_params = compact(model, result.params, masks, budget.structure)
    compact_macs = derive(small, recipe.input_shape).dense_macs
    shape = input_shape or recipe.input_shape  # what the data feeds it
    _, dense_apply = split_nnx(model, train=False)
    _, small_apply = split_nnx(small, train=False)
    timing = compare_latency(
        (dense_apply, dense), (small_apply, small_params), shape, impls=("im2col", "xla")
    )
    channels = kept_counts(budget.structure, masks)
    save_compact(out, small, small_params, shape, info={"channels": channels})
    dense_macs = budget.structure.dense_macs

    def count(tree: Any) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(tree)))

    return {
        "dense_parameters": count(dense),
        "compact_parameters": count(small_params),
        "dense_macs": dense_macs,
        "compact_macs": compact_macs,
        "macs_reduction": dense_macs / compact_macs,
        "channels": channels,
        "latency": timing,
        "device": str(jax.devices()[0].device_kind),
        "files": ["compact.npz", "compact.json", "compact.jaxexport"],
    }


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def make_report(
    recipe: Recipe,
    result: PruneResult,
    dense_accuracy: float,
    test_accuracy: float,
    dense_info: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    """The ``report.json`` record of one run."""
    admm_seconds = [
        r["seconds"] / recipe.solver["epochs_per_iteration"] for r in result.records("admm")
    ]
    return {
        "problem": recipe.name,
        "model": recipe.problem["model"],
        "data": recipe.problem["data"],
        "method": result.method,
        "budget": result.budget,
        "prunable_weights": result.prunable_weights,
        "nonzero_weights": result.nonzero_weights,
        "kept_fraction": result.kept_fraction,
        "compression": result.prunable_weights / max(result.nonzero_weights, 1),
        "test_accuracy": test_accuracy,
        "test_error": 1.0 - test_accuracy,
        "dense_test_accuracy": dense_accuracy,
        "epochs": result.epochs,
        "dense_epochs": recipe.dense["epochs"],
        "dense_cached": dense_info.get("cached"),
        "wall_seconds": wall_seconds,
        "solver_wall_seconds": result.wall_seconds,
        "timing": {
            "dense_epoch_seconds": _mean(dense_info.get("epoch_seconds", [])),
            "admm_w_step_epoch_seconds": _mean(admm_seconds),
            "retrain_epoch_seconds": _mean([r["seconds"] for r in result.records("retrain")]),
        },
        "converged": result.converged,
        "per_layer": [s.as_dict() for s in result.layers],
        "recipe": recipe.as_dict(),
        "environment": {
            "device": str(jax.devices()[0].device_kind),
            "platform": jax.default_backend(),
            "jax": jax.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "history": result.history,
    }


def save_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Per-layer kept fraction and ADMM loss/residual/accuracy curves, as PNG files.

    Returns the files written; empty when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    layers = report["per_layer"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    kept = [100 * x["kept_fraction"] for x in layers]
    bars = ax.bar([x["name"] for x in layers], kept)
    # A log scale, so a 1.5% layer beside a 70% one is still seen; every bar labelled.
    ax.set_yscale("log")
    ax.set_ylim(max(min([k for k in kept if k > 0] or [1.0]) / 3, 1e-3), 300)
    ax.bar_label(bars, labels=[f"{k:.3g}%" for k in kept], fontsize=7, padding=2)
    ax.set_ylabel("kept (%, log scale)")
    ax.set_title(f"{report['problem']}: {100 * report['kept_fraction']:.2f}% kept overall")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(out / "kept_fraction.png", dpi=120)
    plt.close(fig)
    written.append(str(out / "kept_fraction.png"))
    admm = [r for r in report["history"] if r.get("phase") == "admm"]
    if admm:
        it = [r["iteration"] for r in admm]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
        axes[0].plot(it, [r["loss"] for r in admm])
        axes[0].set_title("training loss")
        axes[1].semilogy(it, [r["primal_relative"] for r in admm], label="primal ||W-Z||/||W||")
        axes[1].semilogy(it, [r["dual_relative"] for r in admm], label="dual ||Z-Z'||/||W||")
        axes[1].legend(fontsize=7)
        axes[1].set_title("relative residuals")
        if "accuracy" in admm[0]:
            axes[2].plot(it, [r["accuracy"] for r in admm], label="W")
            axes[2].plot(it, [r["pruned_accuracy"] for r in admm], label="Proj(W)")
            axes[2].legend(fontsize=7)
        axes[2].set_title("test accuracy")
        for ax in axes:
            ax.set_xlabel("ADMM iteration")
        fig.tight_layout()
        fig.savefig(out / "admm_history.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "admm_history.png"))
    return written
