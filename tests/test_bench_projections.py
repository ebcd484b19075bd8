"""The projection benchmark: one tiny run, its checks, and the table it prints."""

from __future__ import annotations

import json

from admmprune.bench.projections import SINGLE_THREAD_FLAGS, run, table


def test_tiny_run_is_exact_and_tabulated():
    result = run(sizes=(1000,), repeats=1, quick=True)
    json.dumps(result)  # JSON-ready
    (row,) = result["rows"]
    assert row["n"] == 1000 and row["k"] == 100
    assert row["nm_shape"] == [4, 250]
    assert all(row["checks"].values()), row["checks"]
    assert set(row["checks"]) >= {
        "topk_equals_sort_oracle",
        "nm_equals_numpy",
        "energy_within_budget",
        "energy_equals_sort_oracle",
    }
    assert set(row["seconds"]) == {
        "argpartition",
        "sort_oracle",
        "topk_mask_flat",
        "lax_top_k",
        "nm_mask_2_4",
        "numpy_2_4",
        "energy_greedy",
        "energy_greedy_sort",
    }
    assert all(s > 0 for s in row["seconds"].values())
    assert row["topk_ratio"] == row["seconds"]["topk_mask_flat"] / row["seconds"]["argpartition"]
    # pytest has started XLA already, so the flags are only reported, not set.
    assert result["xla_single_thread"] == (SINGLE_THREAD_FLAGS in result["xla_flags"])

    md = table(result)
    lines = md.splitlines()
    assert lines[0] == "# Projections: exact top-k and N:M masks"
    header = next(line for line in lines if line.startswith("| n |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[0] == "n" and "new / argpartition" in columns and "nm / numpy" in columns
    data = next(line for line in lines if line.startswith("| 1,000 |"))
    cells = [c.strip() for c in data.strip("|").split("|")]
    assert len(cells) == len(columns)
    assert cells[-1] == "yes"
    assert cells[columns.index("new / argpartition")] == f"{row['topk_ratio']:.2f}"
    assert cells[columns.index("greedy / argpartition")] == f"{row['energy_ratio']:.2f}"
    assert "| topk_mask_flat within 2x of numpy.argpartition at n = 1,000 |" in md
    assert "| energy greedy within 2x of numpy.argpartition at n = 1,000 |" in md


def test_slow_references_are_skipped_above_the_limit():
    result = run(sizes=(1000,), repeats=1, slow_max=100)
    (row,) = result["rows"]
    assert not {"sort_oracle", "lax_top_k", "energy_greedy_sort"} & set(row["seconds"])
    assert "topk_equals_sort_oracle" not in row["checks"]
    data = next(line for line in table(result).splitlines() if line.startswith("| 1,000 |"))
    assert data.count("skipped") == 3
