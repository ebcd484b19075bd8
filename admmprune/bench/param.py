"""The parameter-budget suite: ADMM against magnitude pruning, at equal epochs, on MNIST.

    admmprune bench --suite param --out runs/bench          # the full set (half an hour, 2 CPUs)
    admmprune bench --suite param --quick --out runs/quick  # epochs / 10 (a few minutes)

Every run is a recipe in ``solvers/``, so any row can be rerun alone with
``admmprune solve``. Writes ``DIR/<recipe>/report.json`` per run, and
``DIR/results.json`` and ``DIR/results.md`` (the table the README shows),
including a side-by-side timing of an ADMM W-step epoch against a plain
training epoch.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import jax

from admmprune.bench.tables import (
    measured_line,
    results_header,
    target,
    targets_table,
    write_results,
)
from admmprune.recipes import load_recipe

FULL = (
    "lenet300_magnitude_2pct",
    "lenet300_imp_2pct",
    "lenet300_admm_2pct",
    "lenet300_magnitude_1pct",
    "lenet300_imp_1pct",
    "lenet300_admm_1pct",
    "lenet5_admm_1pct",
)
QUICK = ("lenet300_magnitude_2pct", "lenet300_imp_2pct", "lenet300_admm_2pct", "lenet5_admm_1pct")
QUICK_FACTOR = 0.1
METHOD_NAMES = {
    "magnitude": "one-shot magnitude + retrain",
    "iterative_magnitude": "iterative magnitude (Han)",
    "admm": "ADMM + retrain",
}
MODEL_NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5 (Caffe)"}


def time_epochs(recipe_path: Path, repeats: int = 5) -> dict[str, Any]:
    """Times plain and ADMM W-step epochs side by side, alternating, after compiling both.

    Same model, data, optimizer and batch size; the ADMM epoch adds the
    penalty gradient ``rho (W - Z + U)``. Returns the median seconds of each
    and their ratio.
    """
    import optax

    from admmprune.admm import ADMM, Penalty
    from admmprune.models import cross_entropy_loss, init_model
    from admmprune.runner import load_data
    from admmprune.training import run_epoch

    recipe = load_recipe(recipe_path)
    train, _ = load_data(recipe)
    params, apply = init_model(recipe.problem["model"], seed=0)
    loss_fn = cross_entropy_loss(apply)
    opt = optax.adam(1e-3)
    bs = recipe.solver["batch_size"]
    solver = ADMM(budget=recipe.budget_object(), optimizer=opt, batch_size=bs)
    state = solver.init(params, jax.random.key(0))
    flags = tuple(solver.budget.prunable(params))
    plain_state = opt.init(params)
    key = jax.random.key(1)
    plain, admm = [], []
    for i in range(repeats + 1):  # the first round compiles both
        _, _, p = run_epoch(
            params, plain_state, train, key, loss_fn=loss_fn, optimizer=opt, batch_size=bs
        )
        _, _, a = run_epoch(
            params,
            state.opt_state,
            train,
            key,
            loss_fn=loss_fn,
            optimizer=opt,
            batch_size=bs,
            grad_term=Penalty(flags),
            term_args=(state.z, state.u, state.rho, None),
        )
        if i:
            plain.append(p.seconds)
            admm.append(a.seconds)
    p, a = statistics.median(plain), statistics.median(admm)
    return {
        "model": recipe.problem["model"],
        "repeats": repeats,
        "plain_epoch_seconds": p,
        "admm_epoch_seconds": a,
        "ratio": a / p,
        "plain_all": plain,
        "admm_all": admm,
    }


def _row(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("history", "recipe", "plots")}


def run_benchmark(
    out: Path,
    *,
    solvers: Path = Path("solvers"),
    quick: bool = False,
    quiet: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Runs the set, writing one report per run, ``results.json`` and ``results.md``."""
    from admmprune.progress import Progress, total_epochs
    from admmprune.runner import solve, validate

    names = [n for n in (QUICK if quick else FULL) if not only or any(o in n for o in only)]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for name in names:
        recipe = load_recipe(solvers / f"{name}.toml")
        if quick:
            recipe = recipe.scaled(QUICK_FACTOR)
        validate(recipe)
        progress = Progress(total_epochs(recipe), name, enabled=not quiet)
        try:
            report = solve(recipe, out / name, callback=progress)
        finally:
            progress.close()
        rows.append(_row(report))
        if not quiet:
            print(
                f"{name}: test error {report['test_error']:.2%} at "
                f"{report['kept_fraction']:.2%} kept, {report['wall_seconds']:.0f} s",
                flush=True,
            )
    timing = [time_epochs(solvers / "lenet300_admm_2pct.toml", repeats=2 if quick else 5)]
    if any(r["model"] == "lenet5" for r in rows):
        timing.append(time_epochs(solvers / "lenet5_admm_1pct.toml", repeats=2 if quick else 3))
    results = results_header("admmprune bench", quick, started)
    results |= {"runs": rows, "timing": timing, "targets": check_targets(rows, timing)}
    return write_results(out, results, markdown_table, quiet)


def check_targets(rows: list[dict[str, Any]], timing: list[dict[str, Any]]) -> list[dict]:
    """The issue's floors, each with the measured figure and whether it is met."""
    by = {(r["model"], r["method"], round(r["kept_fraction"], 4)): r for r in rows}
    targets = []

    def add(what: str, value: str, met: bool) -> None:
        targets.append(target(what, value, met))

    admm2 = by.get(("lenet300", "admm", 0.02))
    if admm2:
        add(
            "LeNet-300-100, 2% kept: test error <= 2.0%",
            f"{admm2['test_error']:.2%}",
            admm2["test_error"] <= 0.02,
        )
    for kept in (0.02, 0.01):
        admm = by.get(("lenet300", "admm", kept))
        base = [by.get(("lenet300", m, kept)) for m in ("magnitude", "iterative_magnitude")]
        if admm and all(base):
            best = min(b["test_error"] for b in base)
            add(
                f"LeNet-300-100, {kept:.0%} kept: ADMM beats both magnitude baselines",
                f"{admm['test_error']:.2%} vs best baseline {best:.2%}",
                admm["test_error"] < best,
            )
    l5 = by.get(("lenet5", "admm", 0.01))
    if l5:
        add(
            "LeNet-5, 1% kept (100x): test error <= 1.0%",
            f"{l5['test_error']:.2%}",
            l5["test_error"] <= 0.01,
        )
    for t in timing:
        add(
            f"{MODEL_NAMES[t['model']]}: ADMM W-step epoch / plain epoch <= 1.10",
            f"{t['ratio']:.3f} ({t['admm_epoch_seconds']:.2f} s / "
            f"{t['plain_epoch_seconds']:.2f} s)",
            t["ratio"] <= 1.10,
        )
    return targets


def markdown_table(results: dict[str, Any]) -> str:
    """The README's results table."""
    lines = [
        measured_line(results),
        "",
        "| model | method | kept | test error | epochs | wall time |",
        "|---|---|---|---|---|---|",
    ]
    seen_dense = set()
    for r in results["runs"]:
        if r["model"] not in seen_dense:
            seen_dense.add(r["model"])
            lines.append(
                f"| {MODEL_NAMES[r['model']]} | dense | 100% | "
                f"{1 - r['dense_test_accuracy']:.2%} | {r['dense_epochs']} | |"
            )
        lines.append(
            f"| {MODEL_NAMES[r['model']]} | {METHOD_NAMES[r['method']]} | "
            f"{r['kept_fraction']:.2%} ({r['compression']:.0f}x) | {r['test_error']:.2%} | "
            f"{r['dense_epochs']} + {r['epochs']} | {r['solver_wall_seconds']:.0f} s |"
        )
    lines += targets_table(results["targets"])
    return "\n".join(lines) + "\n"
