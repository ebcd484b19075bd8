"""OBS benchmark bookkeeping: the operation count, targets judged from the figures, the table."""

from __future__ import annotations

from admmprune.bench.obs import (
    LAYER_METHODS,
    NAMES,
    check_targets,
    fast_obs_flops,
    markdown_table,
)
from admmprune.bench.tables import target

UNIFORM_TARGET = "10% kept, uniform, no retraining: best OBS variant <= 10% test error"
ALLOC_TARGET = "10% kept overall, OBS allocation, no retraining: <= 3% test error"


def _row(keep, allocation, method, error):
    return {
        "keep": keep,
        "allocation": allocation,
        "method": method,
        "test_error": error,
        "kept_fraction": keep,
        "per_layer_kept": {"fc1": keep, "fc2": 2 * keep, "fc3": 0.5},
        "relative_error": {"fc1": 0.1, "fc2": 0.2, "fc3": 0.05},
        "seconds": 3.0,
    }


def _results(rows):
    return {
        "date": "d",
        "device": "cpu",
        "command": "admmprune bench --suite obs",
        "total_wall_seconds": 600,
        "dense_test_error": 0.0184,
        "calibration_examples": 4096,
        "oneshot": rows,
        "fast_obs_timing": [
            {
                "layer": "1024 x 1024",
                "calibration_rows": 4096,
                "seconds": 2.0,
                "gflop": 10.0,
                "gflops_per_second": 5.0,
                "matmul_gflops_per_second": 50.0,
            }
        ],
        "admm_hard_prune": [
            {
                "recipe": "lenet300_admm_obs_1pct",
                "hard_prune": "obs",
                "pruned_error_zeroed": 0.5,
                "pruned_error": 0.05,
                "test_error": 0.02,
                "epochs": 60,
            }
        ],
    }


def test_fast_obs_flops_counts_each_term():
    # X^T X, Cholesky + inverse, in-block updates, lazy updates of later columns.
    assert fast_obs_flops(4, 8, 16, 2) == 2 * 16 * 64 + 2 * 512 / 3 + 2 * 4 * 8 * 2 + 4 * 64
    assert fast_obs_flops(2048, 2048, 4096, 128) > fast_obs_flops(1024, 1024, 4096, 128) * 4


def test_every_method_has_a_name():
    assert all(m in NAMES for m in LAYER_METHODS)
    assert ("global_obs", "layer") in NAMES


def test_targets_take_the_best_obs_variant_at_10pct_only():
    rows = [
        _row(0.10, "uniform", NAMES[("magnitude", "layer")], 0.01),  # not OBS: ignored
        _row(0.10, "uniform", NAMES[("fast_obs", "block")], 0.12),
        _row(0.10, "uniform", NAMES[("exact_obs", "layer")], 0.09),
        _row(0.10, "obs", NAMES[("fast_obs", "layer")], 0.04),
        _row(0.10, "obs", NAMES[("exact_obs", "layer")], 0.035),
        _row(0.10, "own (global saliency)", NAMES[("global_obs", "layer")], 0.001),  # neither
        _row(0.05, "uniform", NAMES[("exact_obs", "layer")], 0.001),  # other keep: ignored
        _row(0.05, "obs", NAMES[("exact_obs", "layer")], 0.001),
    ]
    targets = check_targets({"oneshot": rows})
    assert targets == [
        target(UNIFORM_TARGET, "9.00% (exact OBS (OBC))", True),
        target(ALLOC_TARGET, "3.50% (exact OBS (OBC))", False),
    ]
    rows[4]["test_error"] = 0.025
    assert [t["met"] for t in check_targets({"oneshot": rows})] == [True, True]
    rows[2]["test_error"] = 0.11
    met = {t["target"]: t["met"] for t in check_targets({"oneshot": rows})}
    assert met == {UNIFORM_TARGET: False, ALLOC_TARGET: True}


def test_no_rows_at_10pct_no_targets():
    assert (
        check_targets({"oneshot": [_row(0.05, "uniform", NAMES[("fast_obs", "layer")], 0.1)]}) == []
    )


def test_markdown_table_shows_every_figure():
    rows = [
        _row(0.10, "uniform", NAMES[("exact_obs", "layer")], 0.09),
        _row(0.10, "obs", NAMES[("fast_obs", "layer")], 0.04),
    ]
    results = _results(rows)
    results["targets"] = check_targets(results)
    table = markdown_table(results)
    assert table.startswith("Measured d on cpu by `admmprune bench --suite obs` (10 min in all).")
    assert "dense test error 1.84%" in table and "4,096 training images" in table
    assert (
        "| 10% | uniform | exact OBS (OBC) | 9.00% | 10.0% / 20.0% / 50.0% | "
        "0.100 / 0.200 / 0.050 | 3 s |" in table
    )
    assert "| 1024 x 1024 | 4,096 | 2.00 s | 10.0 | 5.0 | 50.0 | 10% |" in table
    assert "| `lenet300_admm_obs_1pct` | obs | 50.00% | 5.00% | 2.00% | 60 |" in table
    assert table.count("| yes |") == 1 and table.count("| no |") == 1
    assert table.endswith("\n")


def test_markdown_table_marks_missing_reconstruction_errors():
    row = _row(0.10, "own (global saliency)", NAMES[("global_obs", "layer")], 0.05)
    row["relative_error"] = {}
    results = _results([row]) | {"targets": []}
    assert "| global OBS (WoodFisher) | 5.00% | 10.0% / 20.0% / 50.0% | - | 3 s |" in (
        markdown_table(results)
    )
