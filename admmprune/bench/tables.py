"""What every benchmark suite's results share: the header, the files, the target rows.

``results.json`` opens with :func:`results_header`; :func:`write_results`
writes it and ``results.md``; each suite's targets are :func:`target` rows,
shown by :func:`targets_table` under a :func:`measured_line`.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from admmprune.recipes import Recipe

if TYPE_CHECKING:
    from admmprune.llm.runner import LLMRecipe


def finished_report(recipe: Recipe | LLMRecipe, out: Path) -> dict[str, Any] | None:
    """``out/report.json`` if this very recipe wrote it (its ``matches``), else None."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, json.JSONDecodeError):  # none, or cut off: not finished
        return None
    if not isinstance(report, dict):
        return None
    return report if recipe.matches(report.get("recipe", {})) else None


def solve_or_reuse(
    recipe: Recipe, out: Path, *, label: str, quiet: bool, plots: bool
) -> dict[str, Any]:
    """``runner.solve``, unless ``out/report.json`` was written by this very recipe.

    A benchmark that stops part way (or one run again with more seeds or
    budgets) picks up its finished runs instead of repeating them (a report
    older than some recipe key matches where the recipe has that key's
    default: :meth:`Recipe.matches`); a report from any other recipe is
    overwritten by a fresh run. A run stopped part way resumes from its
    checkpoint when this recipe wrote it; another recipe's is discarded.
    """
    from admmprune.progress import Progress, total_epochs
    from admmprune.runner import solve

    report = finished_report(recipe, out)
    if report is not None:
        if not quiet:
            print(f"{label}: reusing {out / 'report.json'}", flush=True)
        return report
    resume = resumable(recipe, out)
    if resume and not quiet:
        print(f"{label}: resuming {out / 'checkpoint.npz'}", flush=True)
    progress = Progress(total_epochs(recipe), label, enabled=not quiet)
    try:
        return solve(
            recipe, out, callback=progress, plots=plots, resume=resume, overwrite=not resume
        )
    finally:
        progress.close()


def resumable(recipe: Recipe, out: Path) -> bool:
    """Whether ``out/checkpoint.npz`` is a readable checkpoint of this recipe's run."""
    from admmprune.checkpoint import CheckpointError, read_meta

    path = out / "checkpoint.npz"
    if not path.exists():
        return False
    try:
        return read_meta(path).get("fingerprint") == recipe.fingerprint()
    except CheckpointError:
        return False


def results_header(command: str, quick: bool, started: float) -> dict[str, Any]:
    """What every suite's ``results.json`` opens with: command, date, device, wall time."""
    return {
        "command": command + (" --quick" if quick else ""),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {platform.machine()}",
        "quick": quick,
        "total_wall_seconds": time.perf_counter() - started,
    }


def write_results(
    out: Path, results: dict[str, Any], table: Callable[[dict[str, Any]], str], quiet: bool
) -> dict[str, Any]:
    """Writes ``results.json`` and ``results.md`` (``table(results)``) into ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table(results))
    if not quiet:
        print(table(results))
    return results


def target(what: str, measured: str, met: bool) -> dict[str, Any]:
    """One row of a suite's targets: the floor, the measured figure, whether it is met."""
    return {"target": what, "measured": measured, "met": bool(met)}


def measured_line(results: dict[str, Any]) -> str:
    """``Measured <date> on <device> by `<command>` (<N> min in all).``"""
    return (
        f"Measured {results['date']} on {results['device']} by `{results['command']}` "
        f"({results['total_wall_seconds'] / 60:.0f} min in all)."
    )


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    """The markdown rows of a suite's target table."""
    lines = ["", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |")
    return lines


__all__ = ["measured_line", "results_header", "target", "targets_table", "write_results"]
