"""The structured suite: fewer MACs by removing neurons and filters, against the baselines and
against training the small network from scratch; 2:4 rows; the compact networks' speed.

    admmprune bench --suite structured --out runs/bench-structured
    admmprune bench --suite structured --quick --out runs/quick   # epochs / 10

Rows (each method a recipe in ``solvers/``): LeNet-300-100 and LeNet-5 on
MNIST at 4x and 10x fewer MACs, the residual CNN on Fashion-MNIST at 2x and
4x fewer MACs and one depth row (whole residual branches), with structured
ADMM, one-shot group-norm pruning, L1-norm filter pruning, structured
one-shot OBS and (with BatchNorm) network slimming, all retrained for equal
epochs; then, for the architecture structured ADMM found,
Scratch-E (a fresh init trained for the pipeline's epochs: dense plus
pruning), Scratch-B (the same training compute, at most twice the epochs, as
Liu et al., ICLR 2019, cap it) and the dense network uniformly narrowed to
the same MACs, trained from scratch like Scratch-E. Every row's MACs are
counted on its compact network, and the compact network's inference time is
measured beside the dense one's (batch 256 and 1, medians). Then one 2:4 row
per model (ADMM, magnitude, OBS refit; no compact network, no speed figure).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from admmprune.bench.tables import (
    finished_report,
    measured_line,
    results_header,
    solve_or_reuse,
    target,
    targets_table,
    write_results,
)
from admmprune.recipes import load_recipe

MODELS = ("lenet300", "lenet5", "rescnn")
METHODS = ("admm", "magnitude", "l1", "obs")
NM_METHODS = ("admm", "magnitude", "obs")


def rows_of(model: str) -> list[tuple[str, list[tuple[str, str]], str]]:
    """``(row name, [(recipe, method)], ADMM's recipe)`` for each structured row of a model."""
    reductions = ("2x", "4x") if model == "rescnn" else ("4x", "10x")
    methods = METHODS + (("slimming",) if model == "rescnn" else ())
    rows = []
    for red in reductions:
        recipes = [(f"{model}_structured_{m}_{red}", m) for m in methods]
        rows.append((f"{model} {red} fewer MACs", recipes, f"{model}_structured_admm_{red}"))
    if model == "rescnn":
        recipes = [(f"rescnn_depth_{m}_075", m) for m in ("admm", "magnitude")]
        rows.append(("rescnn depth, 75% of MACs", recipes, "rescnn_depth_admm_075"))
    return rows


QUICK_FACTOR = 0.1
NAMES = {
    "admm": "structured ADMM",
    "magnitude": "one-shot group norm + retrain",
    "l1": "L1-norm filter/neuron (Li et al.)",
    "obs": "structured one-shot OBS + retrain",
    "slimming": "network slimming (Liu et al.)",
    "scratch_e": "Scratch-E (ADMM's architecture)",
    "scratch_b": "Scratch-B (ADMM's architecture)",
    "uniform": "uniformly narrowed, from scratch",
}
NM_NAMES = {
    "admm": "ADMM, 2:4 projection",
    "magnitude": "2:4 magnitude + retrain",
    "obs": "SparseGPT 2:4 (fast OBS) + retrain",
}
SCRATCH = ("scratch_e", "scratch_b", "uniform")


def _name(row: dict[str, Any]) -> str:
    names = NM_NAMES if row["row"].endswith("2:4") else NAMES
    return names.get(row["method"], row["method"])


MODEL_NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5 (Caffe)", "rescnn": "ResCNN"}


def _row(report: dict[str, Any], method: str) -> dict[str, Any]:
    keep = ("model", "test_accuracy", "test_error", "dense_test_accuracy", "epochs", "dense_epochs")
    row = {k: report[k] for k in keep}
    row |= {"method": method, "solver_wall_seconds": report["solver_wall_seconds"]}
    row["budget"] = report["budget"]
    if "compact" in report:
        c = report["compact"]
        row |= {
            "compact_macs": c["compact_macs"],
            "dense_macs": c["dense_macs"],
            "macs_reduction": c["macs_reduction"],
            "channels": c["channels"],
            "compact_parameters": c["compact_parameters"],
            "dense_parameters": c["dense_parameters"],
            "latency": c["latency"],
        }
    else:
        row["kept_fraction"] = report["kept_fraction"]
    return row


def scratch_runs(
    recipe: Any, admm_dir: Path, epochs: int, *, quiet: bool = False
) -> list[dict[str, Any]]:
    """Scratch-E, Scratch-B and uniform narrowing for the architecture in ``admm_dir``.

    The architecture is the one structured ADMM left (``params.npz`` there);
    each network starts from a fresh init (:func:`admmprune.compact.fresh_init`,
    seed ``problem.seed + 10``) and trains with the dense recipe's optimizer.
    ``epochs`` is Scratch-E's: the dense epochs plus the pruning run's.
    """
    import admmprune
    from admmprune.checkpoint import load_params
    from admmprune.compact import compact, fresh_init, uniform_masks
    from admmprune.groups import derive
    from admmprune.models import INPUT_SHAPES, accuracy, cross_entropy_loss
    from admmprune.nnx import split_nnx
    from admmprune.recipes import make_optimizer
    from admmprune.runner import _network, load_data

    train, test = load_data(recipe)
    model = _network(recipe)
    shape = INPUT_SHAPES[recipe.problem["model"]]
    budget = recipe.budget_object()
    structure = budget.structure
    params, _ = split_nnx(model)
    pruned = load_params(admm_dir / "params.npz", params)
    masks = jax.tree.map(lambda x: x != 0, pruned)
    uniform, fraction = uniform_masks(structure, params, budget.capacity)
    seed = recipe.problem["seed"] + 10
    out = []
    dense = recipe.dense
    for name, m in (("admm_arch", masks), ("uniform", uniform)):
        small, _ = compact(model, params, m, structure)
        small, start = fresh_init(small, seed)
        small_macs = derive(small, shape).dense_macs
        ratio = structure.dense_macs / small_macs
        runs = [("scratch_e", epochs), ("scratch_b", round(epochs * min(ratio, 2.0)))]
        if name == "uniform":
            runs = [("uniform", epochs)]
        _, apply = split_nnx(small)
        for method, n in runs:
            tick = time.perf_counter()
            trained, _ = admmprune.train(
                start,
                cross_entropy_loss(apply),
                train,
                optimizer=make_optimizer(dense["optimizer"], dense["learning_rate"]),
                epochs=n,
                batch_size=dense["batch_size"],
                key=jax.random.key(seed),
                phase="scratch",
            )
            acc = accuracy(apply, trained, *test)
            row = {
                "model": recipe.problem["model"],
                "method": method,
                "test_accuracy": acc,
                "test_error": 1 - acc,
                "epochs": n,
                "dense_epochs": 0,
                "compact_macs": small_macs,
                "dense_macs": structure.dense_macs,
                "macs_reduction": ratio,
                "compact_parameters": int(sum(np.size(x) for x in jax.tree.leaves(trained))),
                "solver_wall_seconds": time.perf_counter() - tick,
            }
            if name == "uniform":
                row["uniform_fraction"] = fraction
            out.append(row)
            if not quiet:
                print(f"  {method}: test error {1 - acc:.2%}, {n} epochs", flush=True)
    return out


class _Rows(list):
    """This invocation's rows, each also appended to ``rows.jsonl`` as it completes
    (a long suite that is stopped keeps what it measured).

    ``before`` holds the rows an earlier invocation left in the file, read before
    it is started afresh: suites from before controls were kept beside their ADMM
    run (``controls.json``) find them there.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.before = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.before.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut off when a run was killed
                    continue
        path.write_text("")

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def saved_controls(admm_dir: Path, epochs: int) -> list[dict[str, Any]] | None:
    """The Scratch and uniform rows kept in ``admm_dir/controls.json``, if they were
    trained for the architecture now in ``admm_dir/params.npz`` and for ``epochs``."""
    try:
        saved = json.loads((admm_dir / "controls.json").read_text())
        fresh = saved["params_sha256"] == _digest(admm_dir / "params.npz")
        rows = saved["rows"]
        methods = {r.get("method") for r in rows}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return None
    if not fresh or saved.get("epochs") != epochs or methods != set(SCRATCH):
        return None
    return rows


def save_controls(admm_dir: Path, epochs: int, rows: list[dict[str, Any]]) -> None:
    """Keeps the controls beside the ADMM run whose architecture they trained."""
    record = {"params_sha256": _digest(admm_dir / "params.npz"), "epochs": epochs, "rows": rows}
    partial = admm_dir / "controls.json.partial"
    partial.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    partial.replace(admm_dir / "controls.json")


def run_structured_benchmark(
    out: Path,
    *,
    solvers: Path = Path("solvers"),
    quick: bool = False,
    quiet: bool = False,
    models: tuple[str, ...] = MODELS,
    nm: bool = True,
) -> dict[str, Any]:
    """Runs the suite; writes ``DIR/<recipe>/``, ``results.json`` and ``results.md``.

    ``models`` limits it to some models; ``nm=False`` skips the 2:4 rows. Runs
    finished in ``out`` by the same recipe are reused, and with them the Scratch
    and uniform controls kept beside the ADMM run they copy
    (``DIR/<admm recipe>/controls.json``), so a stopped suite resumes and a
    run for some models keeps the others' runs and controls (``results.json``,
    ``results.md`` and ``rows.jsonl`` then describe this invocation's models).
    """
    from admmprune.runner import validate

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = _Rows(out / "rows.jsonl")
    reused: set[str] = set()

    def run(name: str, method: str, row_name: str) -> dict[str, Any]:
        recipe = load_recipe(solvers / f"{name}.toml")
        if quick:
            recipe = recipe.scaled(QUICK_FACTOR)
        validate(recipe)
        if finished_report(recipe, out / name) is not None:
            reused.add(name)
        report = solve_or_reuse(recipe, out / name, label=name, quiet=quiet, plots=False)
        row = _row(report, method) | {"row": row_name, "recipe": name}
        rows.append(row)
        if not quiet:
            print(f"{name}: test error {row['test_error']:.2%}", flush=True)
        return report

    for model in models:
        for row_name, recipes, admm_name in rows_of(model):
            for name, method in recipes:
                report = run(name, method, row_name)
                if name == admm_name:
                    admm_report = report
            recipe = load_recipe(solvers / f"{admm_name}.toml")
            if quick:
                recipe = recipe.scaled(QUICK_FACTOR)
            epochs = admm_report["dense_epochs"] + admm_report["epochs"]
            # The controls of a reused ADMM run are reused too, if they were finished.
            controls = saved_controls(out / admm_name, epochs)
            old = [r for r in rows.before if r.get("row") == row_name and r["method"] in SCRATCH]
            if (
                controls is None
                and admm_name in reused
                and {r["method"] for r in old} == set(SCRATCH)
            ):
                controls = [{k: v for k, v in r.items() if k not in ("row", "budget")} for r in old]
                save_controls(out / admm_name, epochs, controls)
            if controls is None:
                controls = scratch_runs(recipe, out / admm_name, epochs, quiet=quiet)
                save_controls(out / admm_name, epochs, controls)
            for r in controls:
                rows.append(r | {"row": row_name, "budget": admm_report["budget"]})
        for method in NM_METHODS if nm else ():
            run(f"{model}_nm24_{method}", method, f"{model} 2:4")
    results = results_header("admmprune bench --suite structured", quick, started)
    results |= {"runs": list(rows), "targets": check_targets(rows)}
    return write_results(out, results, markdown_table, quiet)


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's floors that this suite measures, each with its figure and verdict."""
    targets = []
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_row.setdefault(r["row"], []).append(r)
    for name, rs in by_row.items():
        structured = [r for r in rs if "compact_macs" in r]
        if structured:
            cap = rs[0]["budget"]["macs"]
            worst = max(r["compact_macs"] for r in structured)
            targets.append(
                target(
                    f"{name}: every result within the MACs budget ({cap:.0f}), counted on the "
                    "compact network",
                    f"largest {worst:.0f}",
                    worst <= cap + 1e-6,
                )
            )
        admm = next((r for r in rs if r["method"] == "admm"), None)
        if admm is not None:
            best = max(rs, key=lambda r: r["test_accuracy"])
            targets.append(
                target(
                    f"{name}: {'ADMM' if name.endswith('2:4') else 'structured ADMM'} has the best "
                    "test accuracy",
                    f"ADMM {admm['test_error']:.2%} error; best {_name(best)}"
                    f" {best['test_error']:.2%}",
                    best is admm or best["test_accuracy"] <= admm["test_accuracy"],
                )
            )
        if admm is not None and name == "rescnn 2x fewer MACs":
            loss = admm["dense_test_accuracy"] - admm["test_accuracy"]
            targets.append(
                target(
                    f"{name}: structured ADMM loses at most 0.5 points against dense",
                    f"{100 * loss:.2f} points ({admm['test_error']:.2%} vs dense "
                    f"{1 - admm['dense_test_accuracy']:.2%})",
                    loss <= 0.005,
                )
            )
        if admm is not None and admm.get("latency") and admm["model"] != "lenet300":
            need = 0.7 * admm["macs_reduction"]
            forms = [("the library's im2col convolution in both", admm["latency"])]
            if "best" in admm["latency"]:
                best_forms = admm["latency"]["best"]["batch_256"]
                forms.append(
                    (
                        f"the faster form of each (dense {best_forms['dense_impl']}, compact "
                        f"{best_forms['compact_impl']})",
                        admm["latency"]["best"],
                    )
                )
            for how, lat in forms:
                t = lat["batch_256"]
                targets.append(
                    target(
                        f"{name}: compact inference at batch 256 >= 0.7 x the MACs ratio faster, "
                        f"{how}",
                        f"{t['speedup']:.2f}x faster for {admm['macs_reduction']:.2f}x fewer MACs "
                        f"(needs {need:.2f}x)",
                        t["speedup"] >= need,
                    )
                )
    return targets


def markdown_table(results: dict[str, Any]) -> str:
    """The README's table: one line per method and row."""
    lines = [
        measured_line(results),
        "",
        "| row | method | test error | MACs (reduction) | params | epochs | "
        "batch 256 / batch 1 speedup, im2col | the same, faster form of each |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen = set()
    for r in results["runs"]:
        if r["row"] not in seen:
            seen.add(r["row"])
            lines.append(
                f"| {r['row']} | dense | {1 - r.get('dense_test_accuracy', float('nan')):.2%} "
                f"| {r.get('dense_macs', '')} | {r.get('dense_parameters', '')} "
                f"| {r.get('dense_epochs', '')} | | |"
            )
        macs = (
            f"{r['compact_macs']:.0f} ({r['macs_reduction']:.2f}x)"
            if "compact_macs" in r
            else f"{r.get('kept_fraction', 0):.1%} of weights"
        )
        speed = best = ""
        if r.get("latency"):
            lat = r["latency"]
            speed = f"{lat['batch_256']['speedup']:.2f}x / {lat['batch_1']['speedup']:.2f}x"
            if "best" in lat:
                best = (
                    f"{lat['best']['batch_256']['speedup']:.2f}x / "
                    f"{lat['best']['batch_1']['speedup']:.2f}x"
                )
        epochs = f"{r['dense_epochs']} + {r['epochs']}" if r["dense_epochs"] else f"{r['epochs']}"
        lines.append(
            f"| {r['row']} | {_name(r)} | {r['test_error']:.2%} | "
            f"{macs} | {r.get('compact_parameters', '')} | {epochs} | {speed} | {best} |"
        )
    lines += targets_table(results["targets"])
    return "\n".join(lines) + "\n"


__all__ = ["check_targets", "markdown_table", "run_structured_benchmark", "scratch_runs"]
