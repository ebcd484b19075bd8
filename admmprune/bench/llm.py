"""The LLM suite: SmolLM2-135M pruned by every pruner at every sparsity, on the same windows.

    admmprune bench --suite llm --out runs/bench-llm            # the shipped recipes
    admmprune bench --suite llm --quick --out runs/bench-llm-q  # 8 windows of 256, 4,096 tokens

Each row is a recipe ``solvers/smollm2_<method>_<sparsity>.toml`` run by
:func:`admmprune.llm.runner.solve_llm` into ``DIR/<recipe>/`` (a finished
run of the same settings is reused). All share the seed, so every method
sees the same calibration and held-out windows and is scored on the same
tokens. The table gives the dense perplexity, each pruned perplexity, the
whole pruning time, the pruners' own time (the forward passes all methods
share excluded) and the mean held-out reconstruction error, and checks the
issue's targets against SparseGPT.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from admmprune.bench.tables import (
    finished_report,
    measured_line,
    results_header,
    target,
    targets_table,
)
from admmprune.bench.tables import write_results as _write

SPARSITIES = ("50pct", "70pct", "80pct", "2of4")
METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
QUICK = {"calibration_windows": 8, "held_out_windows": 2, "context": 256, "eval_tokens": 4096}
#: ADMM's perplexity against SparseGPT's: at most this ratio, per sparsity.
PPL_TARGETS = {"50pct": 1.0, "70pct": 0.9, "80pct": 0.9, "2of4": 1.0}


def run_llm_benchmark(
    out: Path,
    *,
    solvers: Path = Path("solvers"),
    quick: bool = False,
    quiet: bool = False,
    sparsities: tuple[str, ...] = SPARSITIES,
    methods: tuple[str, ...] = METHODS,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs the suite; writes ``DIR/<recipe>/``, ``results.json`` and ``results.md``."""
    from admmprune.llm.runner import load_llm_recipe, solve_llm

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for sparsity in sparsities:
        for method in methods:
            name = f"smollm2_{method}_{sparsity}"
            keys = (QUICK if quick else {}) | (overrides or {})
            recipe = load_llm_recipe(solvers / f"{name}.toml", keys)
            report = finished_report(recipe, out / name)
            if report is None:
                report = solve_llm(recipe, out / name, quiet=quiet)
            elif not quiet:
                print(f"{name}: reusing {out / name / 'report.json'}", flush=True)
            summary = {k: v for k, v in report.items() if k not in ("layers", "recipe", "config")}
            rows.append(
                summary
                | {
                    "set": report["sparsity"],
                    "recipe": name,
                    "method": method,
                    "sparsity": sparsity,
                    "layers": [
                        {k: r[k] for k in ("block", "layer", "error", "held_out_error")}
                        for r in report["layers"]
                    ],
                }
            )
    results = results_header("admmprune bench --suite llm", quick, started)
    results |= {"runs": rows, "targets": check_targets(rows)}
    return _write(out, results, markdown_table, quiet)


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's floors against SparseGPT, per sparsity, where both ran."""
    targets = []
    by = {(r["sparsity"], r["method"]): r for r in rows}
    for sparsity in SPARSITIES:
        admm, sgpt = by.get((sparsity, "admm")), by.get((sparsity, "sparsegpt"))
        if admm is None or sgpt is None:
            continue
        ratio = PPL_TARGETS[sparsity]
        targets.append(
            target(
                f"{sparsity}: ADMM perplexity <= {ratio:g} x SparseGPT's",
                f"{admm['perplexity']:.2f} vs {sgpt['perplexity']:.2f} "
                f"({admm['perplexity'] / sgpt['perplexity']:.3f}x)",
                admm["perplexity"] <= ratio * sgpt["perplexity"],
            )
        )
        pairs = [
            (a["held_out_error"], s["held_out_error"])
            for a, s in zip(admm["layers"], sgpt["layers"], strict=True)
            if a["held_out_error"] is not None and s["held_out_error"] is not None
        ]
        if pairs:
            better = sum(a < s for a, s in pairs) / len(pairs)
            targets.append(
                target(
                    f"{sparsity}: ADMM's held-out layer error below SparseGPT's "
                    "on >= 95% of layers",
                    f"{better:.1%} of {len(pairs)} layers",
                    better >= 0.95,
                )
            )
        targets.append(
            target(
                f"{sparsity}: ADMM solver time <= 3 x SparseGPT's",
                f"{admm['solver_seconds']:.0f} s vs {sgpt['solver_seconds']:.0f} s",
                admm["solver_seconds"] <= 3 * sgpt["solver_seconds"],
            )
        )
    return targets


def markdown_table(results: dict[str, Any]) -> str:
    """Dense, then every method at every sparsity, then the targets."""
    runs = results["runs"]
    lines = ["# LLM: SmolLM2-135M, layer by layer", "", measured_line(results), ""]
    if runs:
        r0 = runs[0]
        lines.append(
            f"Dense perplexity {r0['dense_perplexity']:.2f} on {r0['eval_tokens']:,} tokens; "
            f"{r0['calibration_tokens']:,} calibration and {r0['held_out_tokens']:,} held-out "
            "tokens (the same windows for every method)."
        )
    lines += [
        "",
        "| sparsity | method | perplexity | pruning (s) | solver (s) | held-out error | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        held = r["mean_held_out_error"]
        lines.append(
            f"| {r['sparsity']} | {r['method']} | {r['perplexity']:.2f} | "
            f"{r['pruning_seconds']:.0f} | {r['solver_seconds']:.0f} | "
            f"{'' if held is None else f'{held:.4f}'} | {r['peak_memory_mib']:.0f} |"
        )
    lines += targets_table(results["targets"])
    return "\n".join(lines) + "\n"


__all__ = ["check_targets", "markdown_table", "run_llm_benchmark"]


# SmolLM2-135M's block: (d_out, d_in) of each group of matrices that share their inputs.
SMOLLM2_GROUPS = (
    ((576, 576), (192, 576), (192, 576)),
    ((576, 576),),
    ((1536, 576),) * 2,
    ((576, 1536),),
)


def synthetic_hessian(d_in: int, seed: int, tokens: int = 4096) -> Any:
    """``X^T X / n`` of inputs with a decaying spectrum and a few outlier features (as
    LLM activations have): a stand-in for a layer's calibration Hessian."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d_in, d_in)) * (np.arange(1, d_in + 1) ** -0.7)[None, :]
    x = rng.standard_normal((tokens, d_in)) @ a.T + 0.1 * rng.standard_normal((tokens, d_in))
    x[:, rng.choice(d_in, 8, replace=False)] *= 20
    return x.T @ x / tokens


def block_timing(fraction: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """SparseGPT against layer-wise ADMM on one SmolLM2-shaped block, side by side.

    Synthetic Hessians (:func:`synthetic_hessian`) and Gaussian weights of the
    block's seven shapes, grouped as the pipeline groups them (ADMM decomposes
    each group's H once); every solver compiled first, then timed. Returns the
    seconds and the summed reconstruction errors of each, and their ratios.

        python -c "from admmprune.bench.llm import block_timing; print(block_timing())"
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from admmprune import obs
    from admmprune.layerwise import LayerADMM, factorize
    from admmprune.llm.pipeline import Sparsity, prune_weights

    sparsity, settings = Sparsity(fraction=fraction), LayerADMM()
    rng = np.random.default_rng(seed)
    problems = []
    for g, group in enumerate(SMOLLM2_GROUPS):
        h = synthetic_hessian(group[0][1], seed + g)
        ws = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32) for s in group]
        problems.append((h, ws))

    def solve(method: str) -> tuple[float, float]:
        seconds, error = 0.0, 0.0
        for h, ws in problems:
            tick = time.perf_counter()
            fac = jax.block_until_ready(factorize(h, settings)) if method == "admm" else None
            out = [
                jax.block_until_ready(prune_weights(method, w, h, sparsity, settings, fac))
                for w in ws
            ]
            seconds += time.perf_counter() - tick
            error += sum(obs.reconstruction_error(w, o, h) for w, o in zip(ws, out, strict=True))
        return seconds, error

    for method in ("sparsegpt", "admm"):  # compile every shape first
        solve(method)
    (ts, es), (ta, ea) = solve("sparsegpt"), solve("admm")
    return {
        "sparsegpt_seconds": ts,
        "admm_seconds": ta,
        "time_ratio": ta / ts,
        "sparsegpt_error": es,
        "admm_error": ea,
        "error_ratio": ea / es,
        "device": str(jax.devices()[0].device_kind),
    }
