"""The progress bar: off does nothing, on counts training epochs from the history records."""

from __future__ import annotations

from admmprune.progress import Progress, total_epochs
from admmprune.recipes import load_recipe


def test_disabled_progress_does_nothing(capsys):
    progress = Progress(10, "run", enabled=False)
    assert progress.bar is None
    progress({"phase": "admm", "iteration": 1, "loss": 0.5})
    progress.close()
    assert capsys.readouterr() == ("", "")


def test_enabled_progress_counts_epochs_and_shows_the_figures(capsys):
    progress = Progress(4, "run", enabled=True)
    assert progress.bar is not None and progress.bar.total == 4
    progress({"phase": "dense", "loss": 0.25})
    progress({"phase": "admm", "iteration": 3, "loss": 0.123456, "primal_relative": 0.01})
    assert progress.bar.n == 2
    assert "phase=admm" in progress.bar.postfix
    assert "it=3" in progress.bar.postfix
    assert "loss=0.1235" in progress.bar.postfix and "r=0.01" in progress.bar.postfix
    progress({"phase": "prune", "accuracy": 0.9})  # not an epoch
    assert progress.bar.n == 2 and "acc=0.9" in progress.bar.postfix
    progress({"phase": "retrain", "iteration": 7})  # iteration shown for ADMM only
    assert progress.bar.n == 3 and "it=" not in progress.bar.postfix
    progress({"phase": "projected"})
    assert progress.bar.n == 4
    progress.close()
    assert "run" in capsys.readouterr().err


def test_total_epochs_counts_dense_unless_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMMPRUNE_DATA_DIR", str(tmp_path))
    from admmprune.runner import dense_cache_path, make_solver

    recipe = load_recipe("solvers/lenet300_admm_2pct.toml")
    own = make_solver(recipe, steps_per_epoch=1).epochs
    assert own > 0
    assert total_epochs(recipe) == recipe.dense["epochs"] + own
    path = dense_cache_path(recipe)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert total_epochs(recipe) == own
    uncached = recipe.with_overrides({"dense.cache": False})
    assert total_epochs(uncached) == recipe.dense["epochs"] + own
