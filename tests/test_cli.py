"""The command line end to end on a tiny synthetic recipe, and its errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from admmprune import cli
from admmprune.checkpoint import load_params
from admmprune.models import accuracy, init_model
from admmprune.recipes import RecipeError, load_recipe
from admmprune.runner import load_data, solve

TINY = """
[problem]
model = "lenet300"
data = "synthetic"
seed = 3

[data]
synthetic_train = 512
synthetic_test = 256

[dense]
epochs = 2

[budget]
keep = 0.05

[solver]
method = "admm"
iterations = 2
retrain_epochs = 1
batch_size = 64
"""

REPORT_KEYS = {
    "problem",
    "method",
    "budget",
    "prunable_weights",
    "nonzero_weights",
    "kept_fraction",
    "test_accuracy",
    "dense_test_accuracy",
    "epochs",
    "wall_seconds",
    "per_layer",
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADMMPRUNE_DATA_DIR", str(tmp_path / "cache"))


def _recipe(tmp_path: Path, text: str = TINY, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_solve_writes_a_report_and_params_that_reproduce_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["solve", str(_recipe(tmp_path)), "--out", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "fc1/kernel" in printed and "total" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert report["problem"] == "tiny" and report["method"] == "admm"
    assert report["prunable_weights"] == 266_200
    assert report["nonzero_weights"] == round(0.05 * 266_200)
    assert report["epochs"] == 3
    assert [x["name"] for x in report["per_layer"]] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    assert set(report["per_layer"][0]) >= {"name", "shape", "nonzero", "kept_fraction"}
    with np.load(out / "params.npz") as f:
        assert sorted(f.files) == sorted(
            f"{layer}/{leaf}" for layer in ("fc1", "fc2", "fc3") for leaf in ("kernel", "bias")
        )
    like, apply = init_model("lenet300")
    params = load_params(out / "params.npz", like)
    _, (tx, ty) = load_data(load_recipe(_recipe(tmp_path)))
    assert accuracy(apply, params, tx, ty) == pytest.approx(report["test_accuracy"])
    assert (
        int(sum(np.count_nonzero(np.asarray(params[n]["kernel"])) for n in params))
        == (report["nonzero_weights"])
    )


def test_json_output(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli.main(["solve", str(_recipe(tmp_path)), "--out", str(out), "--json", "--no-plots"]) == 0
    )
    first = json.loads(capsys.readouterr().out)
    assert "history" not in first and first["kept_fraction"] == pytest.approx(0.05, abs=1e-5)
    assert set(first) >= REPORT_KEYS


class _InterruptError(Exception):
    pass


@pytest.mark.parametrize(
    "extra",
    [
        "",
        'metric = "fisher"',
        'metric = "diag_fisher"',
        'layer_allocation = "obs"\ncurve_points = 6',
    ],
    ids=["euclidean", "fisher", "diag_fisher", "obs_allocation"],
)
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, capsys, extra):
    """Also with a Fisher metric in the checkpointed state, and with an allocation that is
    recomputed from the dense params on resume."""
    text = TINY.replace("iterations = 2", "iterations = 3\n" + extra)
    if "layer_allocation" in extra:
        text = text.replace("keep = 0.05", "energy_fraction = 0.1")
    recipe = load_recipe(_recipe(tmp_path, text))
    full = solve(recipe, tmp_path / "full", plots=False)

    def stop_at_second_iteration(record):
        if record.get("phase") == "admm" and record["iteration"] == 2:
            raise _InterruptError  # after iteration 1's checkpoint, before iteration 2's

    with pytest.raises(_InterruptError):
        solve(recipe, tmp_path / "cut", callback=stop_at_second_iteration, plots=False)
    resumed = solve(recipe, tmp_path / "cut", resume=True, plots=False, keep_checkpoint=True)
    assert resumed["resumed_from_iteration"] == 1
    assert (tmp_path / "cut" / "checkpoint.npz").exists()  # kept, as asked
    assert resumed["epochs"] == full["epochs"] == 4
    assert len([r for r in resumed["history"] if r["phase"] == "admm"]) == 3
    assert resumed["test_accuracy"] == full["test_accuracy"]
    like, _ = init_model("lenet300")
    a = load_params(tmp_path / "full" / "params.npz", like)
    b = load_params(tmp_path / "cut" / "params.npz", like)
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]["kernel"]), np.asarray(b[name]["kernel"]))
    if extra:
        return
    # Resuming the kept (finished) checkpoint reproduces the result.
    again = solve(recipe, tmp_path / "cut", resume=True, plots=False, keep_checkpoint=True)
    assert again["test_accuracy"] == full["test_accuracy"]
    # A changed recipe must not pick up this checkpoint.
    other = _recipe(tmp_path, TINY.replace("iterations = 2", "iterations = 4"), name="other")
    args = ["solve", str(other), "--out", str(tmp_path / "cut"), "--resume", "--quiet"]
    assert cli.main(args) == 2
    assert "different recipe" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit, words",
    [
        (("[solver]", "[solver]\nfoo = 1"), "solver.foo: unknown key"),
        (("iterations = 2", 'iterations = "two"'), "solver.iterations: expected an integer"),
        (("iterations = 2", "iterations = 2\nrounds = 3"), "solver.rounds: not a setting of"),
        (("iterations = 2", "iterations = 2\ndevices = 64"), "devices=64, but JAX sees 1"),
        (("keep = 0.05", "count = 300000"), "count=300000 exceeds the 266200 prunable weights"),
        (("keep = 0.05", "keep = 1.5"), "budget.keep: must be in [0, 1]"),
        (('model = "lenet300"', 'model = "vgg"'), "problem.model: 'vgg' is not one of"),
        (("[dense]", "[training]"), "unknown section [training]"),
        (("keep = 0.05", "per_layer = { fc9 = 0.1 }"), "'fc9' matches no prunable leaf"),
        (("iterations = 2", "iterations = 2\nrho = 0.0"), "solver.rho: must be > 0"),
        (("iterations = 2", "iterations = 2\ntol = nan"), "solver.tol: must be a finite number"),
        (("iterations = 2", "iterations = 2\nrho = 1.0\nrho_max = 0.5"), "rho_max=0.5 is below"),
        (("batch_size = 64", "batch_size = 600"), "solver.batch_size: 600 exceeds the 512"),
        (
            ("keep = 0.05", 'per_layer = { fc1 = 0.1 }\nallocation = "uniform"'),
            "budget.allocation",
        ),
        (("keep = 0.05", "energy_fraction = 0.005"), "below the floor"),
        (("keep = 0.05", "energy_fraction = 0.1\nkeep = 0.1"), "exactly one of"),
        (("keep = 0.05", "energy_fraction = 1.5"), "budget.energy_fraction: must be in (0, 1]"),
        (("[solver]", '[energy]\nmodel = "linear"\n[solver]'), "energy.per_weight"),
        (
            ("[solver]", '[energy]\nmodel = "linear"\nper_weight = { fc9 = 1.0 }\n[solver]'),
            "not leaves of params",
        ),
        (("iterations = 2", "iterations = 2\nproject_every = 3"), "solver.project_every: not"),
        (("iterations = 2", 'iterations = 2\nhard_prune = "obc"'), "solver.hard_prune: 'obc'"),
        (('method = "admm"', 'method = "oneshot"\npruner = "obc"'), "solver.pruner: 'obc'"),
        (
            (
                'keep = 0.05\n\n[solver]\nmethod = "admm"\niterations = 2',
                'keep = 0.05\nallocation = "uniform"\n\n[solver]\nmethod = "admm"\n'
                'iterations = 2\nlayer_allocation = "obs"',
            ),
            'layer_allocation = "obs" divides one global budget',
        ),
        (
            ("iterations = 2", "iterations = 2\ndecay_iterations = 3"),
            "decay_iterations=3 exceeds iterations=2",
        ),
        (
            (
                'keep = 0.05\n\n[solver]\nmethod = "admm"\niterations = 2',
                'energy_fraction = 0.5\n\n[solver]\nmethod = "oneshot"\npruner = "global_obs"',
            ),
            "global_obs takes a parameter budget",
        ),
    ],
)
def test_bad_recipes_exit_2_before_any_work(tmp_path, capsys, edit, words):
    path = _recipe(tmp_path, TINY.replace(*edit))
    assert cli.main(["solve", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("admmprune: error:")
    assert not (tmp_path / "cache" / "dense").exists()  # no dense model was trained
    assert not (tmp_path / "o").exists()


def test_overrides_are_validated_too(tmp_path, capsys):
    path = str(_recipe(tmp_path))
    args = ["solve", path, "--out", str(tmp_path / "o"), "--quiet", "--set", "solver.rho=high"]
    assert cli.main(args) == 2
    assert "solver.rho: expected a number, got 'high'" in capsys.readouterr().err


TRAINING_RECIPES = sorted(
    p for p in Path("solvers").glob("*.toml") if not p.stem.startswith("smollm2")
)


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    from admmprune.progress import total_epochs

    assert total_epochs(recipe.scaled(0.1)) < total_epochs(recipe) / 5
    from admmprune.runner import make_solver, validate

    validate(recipe)  # the budget resolves and the solver builds, for every method
    solver_epochs = total_epochs(recipe) - recipe.dense["epochs"]
    assert make_solver(recipe, steps_per_epoch=468).epochs == solver_epochs


def test_energy_recipes_compare_at_equal_epochs():
    from admmprune.progress import total_epochs

    for pct in (20, 12, 8, 7):
        admm = load_recipe(f"solvers/lenet5_energy_{pct}pct.toml")
        psgd = load_recipe(f"solvers/lenet5_energy_psgd_{pct}pct.toml")
        assert total_epochs(admm) == total_epochs(psgd)
        assert admm.budget["energy_fraction"] == psgd.budget["energy_fraction"] == pct / 100
        blind = admm.with_overrides({"budget.energy_fraction": None, "budget.count": 1000})
        assert not blind.is_energy and total_epochs(blind) == total_epochs(admm)


def test_equal_epoch_recipes_really_are_equal():
    from admmprune.progress import total_epochs

    for pct in ("1pct", "2pct"):
        epochs = {
            m: total_epochs(load_recipe(f"solvers/lenet300_{m}_{pct}.toml"))
            for m in ("admm", "magnitude", "imp")
        }
        assert len(set(epochs.values())) == 1, epochs
        quick = {
            m: total_epochs(load_recipe(f"solvers/lenet300_{m}_{pct}.toml").scaled(0.1))
            for m in ("admm", "magnitude", "imp")
        }
        assert len(set(quick.values())) == 1, quick


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.toml")


def test_energy_recipe_reports_its_energy(tmp_path):
    text = TINY.replace("keep = 0.05", "energy_fraction = 0.1")
    text = text.replace(
        'method = "admm"', 'method = "projected_sgd"\nprojected_epochs = 2\nproject_every = 3'
    )
    text = text.replace("iterations = 2\n", "")
    report = solve(load_recipe(_recipe(tmp_path, text)), tmp_path / "o", plots=False)
    assert report["method"] == "projected_sgd" and report["epochs"] == 3
    assert report["budget"]["type"] == "energy"
    assert report["budget"]["fraction"] == pytest.approx(0.1)
    e = report["energy"]
    assert e["pruned"] <= report["budget"]["energy"] and e["fraction"] <= 0.1
    assert e["fraction"] == pytest.approx(e["pruned"] / e["dense"])
    assert sum(x["pruned"] for x in e["per_layer"].values()) == pytest.approx(e["pruned"])
    assert [r["phase"] for r in report["history"]][:3] == ["projected", "projected", "prune"]


@pytest.mark.parametrize(
    "solver",
    [
        'method = "magnitude"\nretrain_epochs = 1\nbatch_size = 64',
        'method = "iterative_magnitude"\nrounds = 2\nepochs_per_round = 1\nbatch_size = 64',
    ],
    ids=["magnitude", "iterative_magnitude"],
)
def test_baseline_recipes_run_end_to_end(tmp_path, solver):
    text = TINY[: TINY.index("[solver]")] + "[solver]\n" + solver + "\n"
    report = solve(load_recipe(_recipe(tmp_path, text)), tmp_path / "o", plots=False)
    assert report["nonzero_weights"] == round(0.05 * 266_200)
    assert report["method"] in ("magnitude", "iterative_magnitude")


def test_oneshot_recipe_prunes_without_retraining(tmp_path):
    text = TINY[: TINY.index("[solver]")] + (
        '[solver]\nmethod = "oneshot"\npruner = "fast_obs"\ncalibration_examples = 256\n'
        "batch_size = 64\n"
    )
    text = text.replace("keep = 0.05", 'keep = 0.05\nallocation = "uniform"')
    report = solve(load_recipe(_recipe(tmp_path, text)), tmp_path / "o", plots=False)
    assert report["method"] == "oneshot_fast_obs" and report["epochs"] == 0
    assert report["nonzero_weights"] == round(0.05 * 266_200)
    layers = report["history"][0]["layers"]
    assert [x["name"] for x in layers] == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    assert all(0 <= x["relative_error"] < 1 for x in layers)


def test_admm_obs_hard_prune_records_both_accuracies(tmp_path):
    text = TINY.replace(
        "iterations = 2", 'iterations = 2\nhard_prune = "obs"\ncalibration_examples = 256'
    )
    report = solve(load_recipe(_recipe(tmp_path, text)), tmp_path / "o", plots=False)
    prune = next(r for r in report["history"] if r["phase"] == "prune")
    assert {"zeroed_accuracy", "accuracy"} <= set(prune)
    assert report["nonzero_weights"] <= round(0.05 * 266_200)


def test_admm_energy_recipe_with_an_obs_layer_allocation(tmp_path):
    """``layer_allocation = "obs"`` in an ADMM recipe: the report's budget is the energy
    budget plus the counts, every layer keeps exactly its count, the energy budget holds."""
    text = TINY.replace("keep = 0.05", "energy_fraction = 0.1").replace(
        "iterations = 2",
        'iterations = 2\nlayer_allocation = "obs"\ncurve_points = 8\ncalibration_examples = 256',
    )
    report = solve(load_recipe(_recipe(tmp_path, text)), tmp_path / "o", plots=False)
    counts = report["budget"]["allocation"]
    assert report["budget"]["type"] == "energy"
    assert report["budget"]["fraction"] == pytest.approx(0.1)
    assert {x["name"]: x["nonzero"] for x in report["per_layer"]} == counts
    assert report["energy"]["fraction"] <= 0.1 * (1 + 1e-9)


def test_structured_bench_names_an_unknown_model(tmp_path, capsys):
    args = ["bench", "--suite", "structured", "--models", "lenet5,resnet50", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "unknown ['resnet50']" in err and "rescnn" in err
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize(
    ("suite", "models", "says"),
    [
        ("all", "lenet5,resnet50", "unknown ['resnet50']"),  # before the param suite runs
        ("structured", " , ", "unknown none given"),
        ("param", "lenet5", "add --suite structured"),
    ],
)
def test_bench_checks_models_before_any_suite_runs(tmp_path, capsys, suite, models, says):
    args = ["bench", "--suite", suite, "--models", models, "--out", str(tmp_path / "b")]
    assert cli.main(args) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------- runs that fail, data kept
def test_a_diverging_learning_rate_fails_with_exit_3_and_writes_no_result(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["solve", str(_recipe(tmp_path)), "--out", str(out), "--quiet", "--no-plots"]
    assert cli.main([*args, "--set", "solver.learning_rate=1e3"]) == 3
    err = capsys.readouterr().err
    assert "run failed: ADMM diverged" in err and "Traceback" not in err
    assert "last good checkpoint" in err  # the dense epochs and any iteration before it
    assert not (out / "report.json").exists() and not (out / "params.npz").exists()


@pytest.mark.parametrize(
    "setting, words",
    [
        ("budget.keep=0", "keep=0 is an empty budget"),
        ("budget.keep=1e-9", "rounds to 0 of the 266200"),
    ],
)
def test_an_empty_budget_is_bad_input(tmp_path, capsys, setting, words):
    args = ["solve", str(_recipe(tmp_path)), "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main([*args, "--set", setting]) == 2
    assert words in capsys.readouterr().err


def test_a_checkpoint_is_never_silently_replaced(tmp_path, capsys):
    recipe = load_recipe(_recipe(tmp_path))
    out = tmp_path / "run"

    def stop_in_the_admm_phase(record):
        if record.get("phase") == "admm" and record["iteration"] == 2:
            raise _InterruptError

    with pytest.raises(_InterruptError):
        solve(recipe, out, callback=stop_in_the_admm_phase, plots=False)
    before = (out / "checkpoint.npz").read_bytes()
    args = ["solve", str(_recipe(tmp_path)), "--out", str(out), "--quiet", "--no-plots"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoint of another run (dense epoch 2, admm iteration 1)" in err
    assert "--resume" in err and "--overwrite" in err
    assert (out / "checkpoint.npz").read_bytes() == before
    assert cli.main([*args, "--overwrite"]) == 0
    assert not (out / "checkpoint.npz").exists()  # removed once the run has finished
    assert (out / "report.json").exists()


def test_resume_needs_a_checkpoint_and_out_must_be_a_directory(tmp_path, capsys):
    recipe = str(_recipe(tmp_path))
    assert cli.main(["solve", recipe, "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "holds no checkpoint.npz to resume; drop --resume" in capsys.readouterr().err
    both = ["solve", recipe, "--out", str(tmp_path / "new"), "--resume", "--overwrite"]
    assert cli.main(both) == 2
    assert "pick one" in capsys.readouterr().err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert cli.main(["solve", recipe, "--out", str(a_file)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "foreign"])
def test_a_damaged_checkpoint_says_what_to_do(tmp_path, capsys, damage):
    recipe = load_recipe(_recipe(tmp_path))
    out = tmp_path / "run"

    def stop(record):
        if record.get("phase") == "admm":
            raise _InterruptError

    with pytest.raises(_InterruptError):
        solve(recipe, out, callback=stop, plots=False)
    ckpt = out / "checkpoint.npz"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "random":
        ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        np.savez(ckpt, a=np.zeros(3))
    args = ["solve", str(_recipe(tmp_path)), "--out", str(out), "--quiet", "--no-plots"]
    assert cli.main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pickled" not in err
    words = {
        "truncated": "truncated or corrupt",
        "empty": "is empty",
        "random": "truncated or corrupt",
        "foreign": "not an admmprune run checkpoint",
    }[damage]
    assert words in err and "--overwrite" in err
    assert cli.main([*args, "--overwrite"]) == 0


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("admmprune ")


def test_the_own_model_example_recipe_parses(monkeypatch):
    """examples/own_model: the import paths resolve and the model builds (no data needed)."""
    monkeypatch.syspath_prepend("examples/own_model")
    recipe = load_recipe(Path("examples/own_model/recipe.toml"))
    assert recipe.problem["model"] == "nets:SmallCNN" and recipe.input_shape == (28, 28, 1)
    assert recipe.budget_object().describe()["keep"] == 0.05


@pytest.mark.parametrize("method", ["magnitude", "l1_filter"])
def test_a_baseline_resumes_its_retraining_epoch_by_epoch(tmp_path, method):
    text = TINY.replace("iterations = 2\n", "").replace("retrain_epochs = 1", "retrain_epochs = 3")
    text = text.replace('method = "admm"', f'method = "{method}"')
    if method == "l1_filter":
        text = text.replace("keep = 0.05", 'type = "channels"\nkeep = 0.5')
    recipe = load_recipe(_recipe(tmp_path, text))
    full = solve(recipe, tmp_path / "full", plots=False)

    def stop_in_the_retraining(record):
        if record.get("phase") == "retrain" and record["epoch"] == 2:
            raise _InterruptError  # after retraining epoch 1's checkpoint

    with pytest.raises(_InterruptError):
        solve(recipe, tmp_path / "cut", callback=stop_in_the_retraining, plots=False)
    resumed = solve(recipe, tmp_path / "cut", resume=True, plots=False)
    assert resumed["resumed_from"]["retrain_epoch"] == 1

    def timeless(history):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert timeless(resumed["history"]) == timeless(full["history"])
    with (
        np.load(tmp_path / "full" / "params.npz") as a,
        np.load(tmp_path / "cut" / "params.npz") as b,
    ):
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
