"""The LLM suite on a tiny GGUF: rows, targets, table, and reuse of finished runs."""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from test_llm_runner import _recipe

from admmprune.bench import llm as bench


def test_suite_tabulates_targets_and_reuses_finished_runs(tmp_path, monkeypatch):
    base = _recipe(tmp_path)  # a tiny model and texts; its keys become overrides
    import tomllib

    keys = tomllib.loads(base.read_text())["llm"]
    solvers = tmp_path / "solvers"
    solvers.mkdir()
    for method in ("sparsegpt", "admm"):
        (solvers / f"smollm2_{method}_50pct.toml").write_text(
            f'[llm]\nmodel = "smollm2"\nmethod = "{method}"\nsparsity = 0.5\n'
        )
    overrides = {k: v for k, v in keys.items() if k not in ("method", "sparsity")}
    run = {"solvers": solvers, "sparsities": ("50pct",), "methods": ("sparsegpt", "admm")}
    out = tmp_path / "bench"
    results = bench.run_llm_benchmark(out, quiet=True, overrides=overrides, **run)
    assert [r["method"] for r in results["runs"]] == ["sparsegpt", "admm"]
    names = [t["target"] for t in results["targets"]]
    assert names == [
        "50pct: ADMM perplexity <= 1 x SparseGPT's",
        "50pct: ADMM's held-out layer error below SparseGPT's on >= 95% of layers",
        "50pct: ADMM solver time <= 3 x SparseGPT's",
    ]
    md = (out / "results.md").read_text()
    assert md.startswith("# LLM: SmolLM2-135M") and "| 50pct | admm |" in md

    def no_solve(*args, **kwargs):
        raise AssertionError("a finished run was solved again")

    monkeypatch.setattr("admmprune.llm.runner.solve_llm", no_solve)
    again = bench.run_llm_benchmark(out, quiet=True, overrides=overrides, **run)
    assert [r["perplexity"] for r in again["runs"]] == [r["perplexity"] for r in results["runs"]]
