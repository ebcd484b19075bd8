"""The results bookkeeping every benchmark suite shares: header, files, target rows."""

from __future__ import annotations

import json
import time

import numpy as np

from admmprune.bench.tables import (
    measured_line,
    results_header,
    target,
    targets_table,
    write_results,
)


def test_results_header_names_the_command_the_device_and_the_wall_time():
    started = time.perf_counter() - 120
    full = results_header("admmprune bench --suite obs", False, started)
    assert full["command"] == "admmprune bench --suite obs"
    assert full["quick"] is False
    assert full["total_wall_seconds"] >= 120
    assert full["date"].endswith(" UTC")
    assert "(cpu)" in full["device"] or "(gpu)" in full["device"] or "(tpu)" in full["device"]
    quick = results_header("admmprune bench", True, time.perf_counter())
    assert quick["command"] == "admmprune bench --quick"
    assert quick["quick"] is True
    assert 0 <= quick["total_wall_seconds"] < 60


def test_target_rows_are_plain_json():
    row = target("error <= 2%", "1.80%", np.float32(0.018) <= 0.02)
    assert row == {"target": "error <= 2%", "measured": "1.80%", "met": True}
    assert type(row["met"]) is bool
    assert json.loads(json.dumps(row)) == row
    assert target("x", "y", 0)["met"] is False


def test_measured_line_and_targets_table():
    results = {"date": "2026-01-02 03:04 UTC", "device": "cpu", "command": "admmprune bench"}
    line = measured_line(results | {"total_wall_seconds": 150})
    assert line == "Measured 2026-01-02 03:04 UTC on cpu by `admmprune bench` (2 min in all)."
    assert "(0 min in all)" in measured_line(results | {"total_wall_seconds": 20})
    rows = targets_table([target("a", "1", True), target("b", "2", False)])
    assert rows == [
        "",
        "| target | measured | met |",
        "|---|---|---|",
        "| a | 1 | yes |",
        "| b | 2 | no |",
    ]
    assert targets_table([]) == ["", "| target | measured | met |", "|---|---|---|"]


def test_write_results_writes_both_files_and_prints_unless_quiet(tmp_path, capsys):
    results = {"command": "c", "runs": [1, 2]}

    def table(r):
        return f"| runs | {len(r['runs'])} |\n"

    back = write_results(tmp_path, results, table, quiet=True)
    assert back is results
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "results.md").read_text() == "| runs | 2 |\n"
    assert capsys.readouterr().out == ""
    write_results(tmp_path, results | {"runs": [1]}, table, quiet=False)
    assert "| runs | 1 |" in capsys.readouterr().out
    assert (tmp_path / "results.md").read_text() == "| runs | 1 |\n"


def test_a_benchmark_resumes_only_its_own_readable_checkpoint(tmp_path):
    import jax.numpy as jnp

    from admmprune.bench.tables import resumable
    from admmprune.checkpoint import RunCheckpoint
    from admmprune.recipes import parse_recipe

    def recipe(keep):
        raw = {"problem": {"model": "lenet300"}, "budget": {"keep": keep}}
        return parse_recipe(raw, name="r")

    assert not resumable(recipe(0.1), tmp_path)  # no checkpoint
    RunCheckpoint(tmp_path / "checkpoint.npz", recipe(0.1).fingerprint()).slot("dense").save(
        {"w": jnp.ones(2)}, {"epoch": 1, "history": []}
    )
    assert resumable(recipe(0.1), tmp_path)
    assert not resumable(recipe(0.2), tmp_path)  # another recipe's: run afresh
    (tmp_path / "checkpoint.npz").write_bytes(b"garbage")
    assert not resumable(recipe(0.1), tmp_path)
