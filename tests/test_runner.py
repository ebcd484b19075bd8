"""runner.solve with a structured budget: the compact network it writes and reports."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

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
    assert set(c["latency"]) == {"batch_256", "batch_1", "by_impl", "best"}
    assert set(c["latency"]["by_impl"]) == {"im2col", "xla"}
    assert c["latency"]["by_impl"]["im2col"]["batch_1"] == c["latency"]["batch_1"]
    for bs in ("batch_256", "batch_1"):
        best = c["latency"]["best"][bs]
        for side in ("dense", "compact"):
            impl = best[f"{side}_impl"]
            fastest = min(v[bs][f"{side}_seconds"] for v in c["latency"]["by_impl"].values())
            assert best[f"{side}_seconds"] == c["latency"]["by_impl"][impl][bs][f"{side}_seconds"]
            assert best[f"{side}_seconds"] == fastest
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
    # One seeded point inside each phase: saves 1-2 are dense epochs, 4-5 ADMM
    # iterations, 7 the first retraining epoch (3 and 6 end a phase).
    rng = random.Random(16)
    points = [rng.randint(1, 2), rng.randint(4, 5), 7]
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


# ------------------------------------------------------------ a user's model and data loader
USER_NET = """
from flax import nnx
import jax


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))
"""
USER_DATA = """
import numpy as np


def load():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    return (x[:512], y[:512]), (x[512:], y[512:])


def wrong_shape():
    (x, y), test = load()
    return (x[:, :5], y), test
"""
USER_RECIPE = """
[problem]
model = "user_nets_{tag}:Tiny"
data = "user_data_{tag}:{loader}"
input_shape = [8]
{extra}

[dense]
epochs = 15
learning_rate = 1e-2

[budget]
keep = 0.25

[solver]
iterations = 2
retrain_epochs = 1
batch_size = 64
"""


def _user_package(tmp_path, monkeypatch, tag: str, net: str = USER_NET) -> None:
    (tmp_path / f"user_nets_{tag}.py").write_text(net)
    (tmp_path / f"user_data_{tag}.py").write_text(USER_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_user_model_and_loader_run_from_a_recipe(tmp_path, monkeypatch) -> None:
    from admmprune import cli
    from admmprune.checkpoint import save_params
    from admmprune.recipes import load_recipe

    monkeypatch.setenv("ADMMPRUNE_DATA_DIR", str(tmp_path / "cache"))
    _user_package(tmp_path, monkeypatch, "a")
    path = tmp_path / "user.toml"
    path.write_text(USER_RECIPE.format(tag="a", loader="load", extra=""))
    assert cli.main(["validate", str(path)]) == 0
    report = solve(load_recipe(path), tmp_path / "run", plots=False)
    assert report["model"] == "user_nets_a:Tiny" and report["kept_fraction"] == 0.25
    assert report["test_accuracy"] > 0.7 and report["dense_cached"] is False
    cached = load_recipe(path)
    assert solve(cached, tmp_path / "again", plots=False)["dense_cached"] is True

    # Another model under the same name (its source changed) never reuses that network.
    keys = cached.dense_key(), cached.fingerprint()
    (tmp_path / "user_nets_a.py").write_text(USER_NET.replace("16", "24"))
    assert load_recipe(path).dense_key() != keys[0]
    assert load_recipe(path).fingerprint() != keys[1]

    # New data from the loader is a new dense model too.
    from admmprune.runner import dense_cache_path

    x, y = np.ones((4, 8), np.float32), np.zeros(4, np.int32)
    assert dense_cache_path(cached, (x, y)) != dense_cache_path(cached, (x + 1, y))
    assert dense_cache_path(cached, (x, y)) == dense_cache_path(cached, (x.copy(), y))

    # Start from the user's own trained params: no dense training.
    (tmp_path / "user_nets_a.py").write_text(USER_NET)
    like, _ = init_model("user_nets_a:Tiny")
    trained = load_params(tmp_path / "run" / "params.npz", like)
    save_params(tmp_path / "mine.npz", trained)
    given = tmp_path / "given.toml"
    given.write_text(
        USER_RECIPE.format(tag="a", loader="load", extra=f'params = "{tmp_path / "mine.npz"}"')
    )
    report = solve(load_recipe(given), tmp_path / "given", plots=False)
    assert not [r for r in report["history"] if r["phase"] == "dense"]
    assert report["dense_test_accuracy"] == pytest.approx(
        json.loads((tmp_path / "run" / "report.json").read_text())["test_accuracy"]
    )


@pytest.mark.parametrize(
    "change, words",
    [
        (("user_nets_b:Tiny", "user_nets_b:Nope"), "cannot import 'user_nets_b:Nope'"),
        (("input_shape = [8]", ""), "needs the shape of one input example"),
        (("user_data_b:load", "user_data_b:wrong_shape"), "have shape (512, 5)"),
        (("input_shape = [8]", "input_shape = [9]"), "cannot take one input of shape (9,)"),
        (("user_nets_b:Tiny", "no_such_pkg:Net"), "No module named 'no_such_pkg'"),
    ],
)
def test_a_user_model_or_loader_that_does_not_fit_is_bad_input(
    tmp_path, monkeypatch, capsys, change, words
) -> None:
    from admmprune import cli

    monkeypatch.setenv("ADMMPRUNE_DATA_DIR", str(tmp_path / "cache"))
    _user_package(tmp_path, monkeypatch, "b")
    path = tmp_path / "user.toml"
    path.write_text(USER_RECIPE.format(tag="b", loader="load", extra="").replace(*change))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
