"""runner.solve with a structured budget: the compact network it writes and reports."""

from __future__ import annotations

import json

import jax
import numpy as np

from admmprune.checkpoint import load_params
from admmprune.compact import load_compact
from admmprune.models import init_model
from admmprune.recipes import parse_recipe
from admmprune.runner import evaluator, load_data, solve


def _tiny(train: int, test: int):
    """LeNet-300-100 on synthetic data, L1 filters to 25% of the MACs, one epoch each."""
    return parse_recipe(
        {
            "problem": {"model": "lenet300", "data": "synthetic", "seed": 0},
            "data": {"synthetic_train": train, "synthetic_test": test},
            "dense": {"epochs": 1, "cache": False},
            "budget": {"type": "macs", "macs_fraction": 0.25},
            "solver": {"method": "l1_filter", "retrain_epochs": 1, "batch_size": 64},
        },
        name="tiny",
    )


def test_solve_with_a_macs_budget_writes_the_compact_network(tmp_path) -> None:
    recipe = _tiny(512, 128)
    report = solve(recipe, tmp_path, plots=False)
    c = report["compact"]
    assert c["compact_macs"] <= 0.25 * c["dense_macs"]
    assert c["compact_parameters"] < c["dense_parameters"]
    assert set(c["latency"]) == {"batch_256", "batch_1"}
    assert set(c["channels"]) == {"fc1/kernel", "fc2/kernel"}
    assert json.loads((tmp_path / "report.json").read_text())["compact"] == c
    # The saved compact network computes what the pruned network does.
    f, small = load_compact(tmp_path)
    assert small["fc1"]["kernel"].shape == (784, c["channels"]["fc1/kernel"])
    like, _ = init_model("lenet300")
    pruned = load_params(tmp_path / "params.npz", like)
    x = load_data(recipe)[1][0][:16]
    np.testing.assert_allclose(f(x), evaluator(recipe)(pruned, x), atol=1e-5)
    assert int(sum(np.size(a) for a in jax.tree.leaves(small))) == c["compact_parameters"]


def test_a_failed_run_leaves_no_earlier_report_behind(tmp_path, monkeypatch) -> None:
    import pytest

    from admmprune import runner

    recipe = _tiny(256, 64)
    (tmp_path / "report.json").write_text('{"recipe": "an earlier run"}')

    def broken(*args, **kwargs):
        raise FloatingPointError("diverged")

    monkeypatch.setattr(runner, "export_compact", broken)
    with pytest.raises(FloatingPointError):
        solve(recipe, tmp_path, plots=False)
    # params.npz of the failed run is there, but no report claims it finished.
    assert (tmp_path / "params.npz").exists() and not (tmp_path / "report.json").exists()
