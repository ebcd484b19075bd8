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


# ------------------------------------------------------- killed at any point, resumed exactly
KILL_RECIPE = """
[problem]
model = "lenet300"
data = "synthetic"
seed = 5

[data]
synthetic_train = 1024
synthetic_test = 256

[dense]
epochs = 3
cache = false

[budget]
keep = 0.05

[solver]
method = "admm"
iterations = 3
retrain_epochs = 2
batch_size = 64
"""
STEPS = 3 + 3 + 2  # dense epochs, ADMM iterations, retraining epochs: one checkpoint each


def _start(recipe, out, env, *extra):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "admmprune.cli", "solve", str(recipe), "--out", str(out)]
    return subprocess.Popen(
        [*cmd, "--quiet", "--no-plots", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _saved_steps(ckpt) -> int:
    from admmprune.checkpoint import CheckpointError, read_meta

    try:
        phases = read_meta(ckpt)["phases"]
    except CheckpointError:  # not written yet
        return 0
    return sum(int(info.get("epoch", info.get("iteration", 0))) for info in phases.values())


def _stop_after(proc, ckpt, steps: int, sig) -> None:
    import time

    deadline = time.monotonic() + 240
    while _saved_steps(ckpt) < steps:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.communicate(timeout=60)  # waits, and closes the pipes


def _finish(proc) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _outcome(out):
    report = json.loads((out / "report.json").read_text())
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in report["history"]]
    with np.load(out / "params.npz") as f:
        params = {k: f[k] for k in f.files}
    return params, history, report["test_accuracy"]


def test_sigkill_at_seeded_points_then_resume_is_bit_identical(tmp_path) -> None:
    """A run killed with SIGKILL after its k-th checkpoint (k drawn from a seeded RNG,
    in every phase), then resumed, ends exactly where an uninterrupted run ends."""
    import os
    import random
    import signal

    recipe = tmp_path / "kill.toml"
    recipe.write_text(KILL_RECIPE)
    env = {**os.environ, "ADMMPRUNE_DATA_DIR": str(tmp_path / "cache")}
    full = _start(recipe, tmp_path / "full", env)
    assert _finish(full)[0] == 0
    want = _outcome(tmp_path / "full")
    points = sorted(random.Random(16).sample(range(1, STEPS), 3))
    assert min(points) <= 3 < max(points)  # dense and later phases are both hit
    for k in points:
        out = tmp_path / f"killed-{k}"
        _stop_after(_start(recipe, out, env), out / "checkpoint.npz", k, signal.SIGKILL)
        assert not (out / "report.json").exists()
        code, err = _finish(_start(recipe, out, env, "--resume"))
        assert code == 0, err
        got = _outcome(out)
        assert got[1] == want[1] and got[2] == want[2], f"killed after step {k}"
        for name in want[0]:
            np.testing.assert_array_equal(got[0][name], want[0][name], err_msg=f"{k}: {name}")


def test_sigterm_ends_with_one_line_saying_how_to_resume(tmp_path) -> None:
    import os
    import signal

    recipe = tmp_path / "kill.toml"
    recipe.write_text(KILL_RECIPE)
    env = {**os.environ, "ADMMPRUNE_DATA_DIR": str(tmp_path / "cache")}
    out = tmp_path / "run"
    proc = _start(recipe, out, env)
    import time

    deadline = time.monotonic() + 240
    while _saved_steps(out / "checkpoint.npz") < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 130
    assert "Traceback" not in err and err.count("\n") == 1
    assert "terminated (SIGTERM)" in err and "--resume" in err
