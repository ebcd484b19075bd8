"""Benchmark bookkeeping: targets are judged from the figures given, the table shows them."""

from __future__ import annotations

from admmprune.bench.param import FULL, QUICK, check_targets, markdown_table


def _row(model, method, kept, error):
    return {
        "model": model,
        "method": method,
        "kept_fraction": kept,
        "test_error": error,
        "dense_test_accuracy": 0.98,
        "dense_epochs": 20,
        "epochs": 80,
        "compression": 1 / kept,
        "solver_wall_seconds": 1.0,
    }


def test_targets_follow_the_figures():
    rows = [
        _row("lenet300", "magnitude", 0.02, 0.03),
        _row("lenet300", "iterative_magnitude", 0.02, 0.025),
        _row("lenet300", "admm", 0.02, 0.018),
        _row("lenet5", "admm", 0.01, 0.012),
    ]
    timing = [
        {"model": "lenet300", "ratio": 1.2, "admm_epoch_seconds": 1.2, "plain_epoch_seconds": 1.0}
    ]
    met = {t["target"]: t["met"] for t in check_targets(rows, timing)}
    assert met == {
        "LeNet-300-100, 2% kept: test error <= 2.0%": True,
        "LeNet-300-100, 2% kept: ADMM beats both magnitude baselines": True,
        "LeNet-5, 1% kept (100x): test error <= 1.0%": False,
        "LeNet-300-100: ADMM W-step epoch / plain epoch <= 1.10": False,
    }
    results = {
        "date": "d",
        "device": "cpu",
        "command": "admmprune bench",
        "total_wall_seconds": 60,
        "runs": rows,
        "targets": check_targets(rows, timing),
    }
    table = markdown_table(results)
    assert "| LeNet-300-100 | ADMM + retrain | 2.00% (50x) | 1.80% |" in table
    assert "| LeNet-300-100 | dense | 100% | 2.00% | 20 | |" in table
    assert table.count("| no |") == 2


def test_quick_set_is_a_subset_of_the_full_set():
    assert set(QUICK) <= set(FULL)
