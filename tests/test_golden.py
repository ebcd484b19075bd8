"""Golden runs: every solver and baseline, short and seeded, on small synthetic problems.

Each case records SHA-256 hashes of its final masks and params and every
non-timing field of its result (or report), in ``tests/golden.json``. The file
was written before the budget-seam redesign (issue 13) and must not change:
a refactor that changes any bit of any result fails here. Regenerate it only
for a deliberate change of behaviour, and say so in the commit:

    ADMMPRUNE_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import admmprune
from admmprune import obs
from admmprune.data import synthetic_classification
from admmprune.models import accuracy, cross_entropy_loss, split_nnx
from admmprune.training import train

GOLDEN = Path(__file__).with_name("golden.json")
# The BLAS kernels the golden hashes were recorded with (tests/conftest.py pins them).
BLAS_CORE = "Haswell"
WRITE = os.environ.get("ADMMPRUNE_WRITE_GOLDEN") == "1"
TIMING = {"seconds", "wall_seconds", "solver_wall_seconds", "timing", "environment", "plots"}


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(16, 24, rngs=rngs)
        self.fc2 = nnx.Linear(24, 12, rngs=rngs)
        self.fc3 = nnx.Linear(12, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc3(jax.nn.relu(self.fc2(x)))


def _openblas_cores() -> dict[str, str]:
    """The kernel family of every OpenBLAS loaded in this process, by library file."""
    import ctypes

    cores = {}
    libs = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[5].startswith("/"):
            libs.add(fields[5].removesuffix(" (deleted)"))
    for path in sorted(p for p in libs if "openblas" in Path(p).name.lower()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in (
            "scipy_openblas_get_corename64_",
            "scipy_openblas_get_corename",
            "openblas_get_corename64_",
            "openblas_get_corename",
        ):
            if hasattr(lib, symbol):
                get = getattr(lib, symbol)
                get.restype = ctypes.c_char_p
                cores[Path(path).name] = get().decode()
                break
    return cores


@pytest.fixture(scope="module", autouse=True)
def _pinned_blas():
    """The hashes hold only with the BLAS kernels they were recorded with."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("golden hashes are checked on Linux, where the OpenBLAS kernels are pinned")
    if os.environ.get("OPENBLAS_CORETYPE") is None:
        pytest.skip(
            f"golden hashes were recorded with OpenBLAS's {BLAS_CORE} kernels, which need "
            "an x86-64 CPU with AVX2 (tests/conftest.py pins them only there)"
        )
    jax.scipy.linalg.cho_factor(jax.numpy.eye(2))  # loads jax's LAPACK (scipy's OpenBLAS)
    cores = _openblas_cores()
    if not cores:
        pytest.skip("no OpenBLAS whose kernels can be read is loaded: the hashes can't be checked")
    wrong = {lib: core for lib, core in cores.items() if core.lower() != BLAS_CORE.lower()}
    assert not wrong, (
        f"OpenBLAS runs {wrong} kernels, not {BLAS_CORE}: set "
        f"OPENBLAS_CORETYPE={BLAS_CORE} before numpy loads (tests/conftest.py does)"
    )


@pytest.fixture(scope="module")
def problem():
    data = synthetic_classification(768, dim=16, classes=4, seed=5)
    test = synthetic_classification(256, dim=16, classes=4, seed=5)
    model = MLP(nnx.Rngs(1))
    params, apply = split_nnx(model)
    loss = cross_entropy_loss(apply)
    params, _ = train(
        params,
        loss,
        (data.x, data.y),
        optimizer=optax.adam(3e-3),
        epochs=6,
        batch_size=64,
        key=jax.random.key(2),
    )

    def evaluate(p):
        return {"accuracy": accuracy(apply, p, test.x, test.y)}

    energy = admmprune.AcceleratorEnergy(admmprune.layer_shapes(model, (16,)))
    return {
        "model": model,
        "params": params,
        "loss": loss,
        "data": (data.x, data.y),
        "eval": evaluate,
        "energy": energy,
    }


def _digest(tree) -> str:
    h = hashlib.sha256()
    for name, leaf in zip(admmprune.leaf_names(tree), jax.tree.leaves(tree), strict=True):
        a = np.asarray(leaf)
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _clean(value):
    """JSON-ready, with the timing fields dropped (they differ run to run)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _record(result) -> dict:
    return _clean(
        {
            "params": _digest(result.params),
            "masks": _digest(result.masks),
            "method": result.method,
            "budget": result.budget,
            "layers": [s.as_dict() for s in result.layers],
            "epochs": result.epochs,
            "converged": result.converged,
            "history": result.history,
        }
    )


def _check(name: str, record: dict) -> None:
    record = json.loads(json.dumps(record, sort_keys=True))
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if WRITE:
        golden[name] = record
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert name in golden, f"no golden record for {name}; write it with ADMMPRUNE_WRITE_GOLDEN=1"
    want = golden[name]
    for key in sorted(set(want) | set(record)):
        assert record.get(key) == want.get(key), f"{name}: {key} differs from the golden run"


def _run(problem, solver, seed=0):
    return solver.run(
        problem["params"],
        problem["loss"],
        problem["data"],
        key=jax.random.key(seed),
        eval_fn=problem["eval"],
    )


# ---------------------------------------------------------------------------- solvers
# Each case builds its solver from the problem. First written against the API of
# 28c0699 (ADMM(rho_growth=, rho_max=, retrain_epochs=, metric="fisher",
# decay_iterations=, allocate=, compensate=), the baselines' retrain_epochs=); the
# constructions now say the same in the redesigned API, golden.json is unchanged.


def _admm(p, rho_max=math.inf, retrain=2, compensate=None, **kw):
    base = dict(
        budget=admmprune.ParamBudget(keep=0.2),
        optimizer=optax.adam(1e-3),
        rho=admmprune.GeometricRho(1e-3, 1.3, rho_max),
        iterations=4,
        finetune=admmprune.Finetune(epochs=retrain, compensate=compensate),
        batch_size=64,
    )
    return admmprune.ADMM(**{**base, **kw})


def _allocated(p, budget):
    """ADMM(allocate=obs_allocation(...)) of 28c0699: the budget narrowed once."""
    return admmprune.obs_allocation(budget, p["model"], p["data"][0][:256])(p["params"])


def _energy(p, fraction=0.4):
    return admmprune.EnergyBudget(p["energy"], fraction=fraction)


def _uniform_oneshot(p, method):
    return admmprune.OneShotPrune(
        budget=admmprune.ParamBudget(keep=0.3, allocation="uniform"),
        model=p["model"],
        method=method,
        calibration_examples=256,
        block=8,
    )


CASES = {
    "admm_param": lambda p: _admm(p),
    "admm_uniform_rho_max": lambda p: _admm(
        p, budget=admmprune.ParamBudget(keep=0.25, allocation="uniform"), rho_max=1.5e-3
    ),
    "admm_per_layer_tol": lambda p: _admm(
        p, budget=admmprune.ParamBudget(per_layer={"fc1": 0.1, "fc2": 40}), tol=0.5
    ),
    "admm_fisher": lambda p: _admm(p, metric=admmprune.Fisher(examples=128)),
    "admm_diag_fisher_decay": lambda p: _admm(
        p, metric=admmprune.DiagFisher(examples=128), budget_ramp=admmprune.BudgetRamp(2)
    ),
    "admm_energy": lambda p: _admm(p, budget=_energy(p)),
    "admm_energy_alloc": lambda p: _admm(p, budget=_allocated(p, _energy(p))),
    "admm_compensate": lambda p: _admm(
        p, compensate=obs.compensator(p["model"], p["data"][0][:256])
    ),
    "magnitude": lambda p: admmprune.MagnitudePrune(
        budget=admmprune.ParamBudget(keep=0.2),
        optimizer=optax.adam(1e-3),
        finetune=admmprune.Finetune(epochs=3),
        batch_size=64,
    ),
    "imp": lambda p: admmprune.IterativeMagnitudePrune(
        budget=admmprune.ParamBudget(keep=0.2),
        optimizer=optax.adam(1e-3),
        rounds=3,
        epochs_per_round=1,
        batch_size=64,
    ),
    "psgd_param": lambda p: admmprune.ProjectedSGD(
        budget=admmprune.ParamBudget(keep=0.2),
        optimizer=optax.sgd(1e-2, momentum=0.9),
        projected_epochs=3,
        project_every=4,
        finetune=admmprune.Finetune(epochs=2),
        batch_size=64,
    ),
    "psgd_energy": lambda p: admmprune.ProjectedSGD(
        budget=_energy(p),
        optimizer=optax.sgd(1e-2, momentum=0.9),
        projected_epochs=3,
        project_every=4,
        decay_epochs=2,
        finetune=admmprune.Finetune(epochs=1, optimizer=optax.adam(1e-3)),
        batch_size=64,
    ),
    **{
        f"oneshot_{m}": functools.partial(_uniform_oneshot, method=m)
        for m in ("exact_obs", "fast_obs", "refit", "wanda", "magnitude")
    },
    "oneshot_global_magnitude_mask": lambda p: admmprune.OneShotPrune(
        budget=admmprune.ParamBudget(keep=0.3),
        model=p["model"],
        method="fast_obs",
        quota="block",
        calibration_examples=256,
        block=8,
    ),
    "oneshot_obs_allocation": lambda p: admmprune.OneShotPrune(
        budget=admmprune.ParamBudget(keep=0.3),
        model=p["model"],
        method="exact_obs",
        allocation="obs",
        calibration_examples=256,
        curve_points=8,
    ),
    "oneshot_energy_allocation": lambda p: admmprune.OneShotPrune(
        budget=_energy(p),
        model=p["model"],
        method="exact_obs",
        allocation="obs",
        calibration_examples=256,
        curve_points=8,
    ),
    "oneshot_global_obs": lambda p: admmprune.OneShotPrune(
        budget=admmprune.ParamBudget(keep=0.3),
        model=p["model"],
        method="global_obs",
        calibration_examples=256,
        fisher_examples=128,
        fisher_block=16,
        fisher_steps=2,
    ),
    "oneshot_retrain": lambda p: admmprune.OneShotPrune(
        budget=admmprune.ParamBudget(keep=0.2),
        model=p["model"],
        method="fast_obs",
        calibration_examples=256,
        block=8,
        finetune=admmprune.Finetune(epochs=2),
        optimizer=optax.adam(1e-3),
        batch_size=64,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_solver_reproduces_its_golden_run(problem, name):
    result = _run(problem, CASES[name](problem))
    _check(name, _record(result))


# ---------------------------------------------------------------------------- recipes
RECIPES = {
    "recipe_admm": {
        "solver": {"method": "admm", "iterations": 2, "retrain_epochs": 1, "rho_growth": 1.5},
        "budget": {"keep": 0.05},
    },
    "recipe_admm_energy_obs": {
        "solver": {
            "method": "admm",
            "iterations": 2,
            "retrain_epochs": 1,
            "layer_allocation": "obs",
            "hard_prune": "obs",
            "calibration_examples": 128,
            "curve_points": 6,
        },
        "budget": {"energy_fraction": 0.3},
    },
    "recipe_imp": {
        "solver": {"method": "iterative_magnitude", "rounds": 2, "epochs_per_round": 1},
        "budget": {"keep": 0.05, "allocation": "uniform"},
    },
    "recipe_psgd": {
        "solver": {"method": "projected_sgd", "projected_epochs": 2, "retrain_epochs": 1},
        "budget": {"energy_fraction": 0.3},
    },
    "recipe_oneshot": {
        "solver": {"method": "oneshot", "pruner": "fast_obs", "calibration_examples": 128},
        "budget": {"keep": 0.1},
    },
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_reproduces_its_golden_report(tmp_path, monkeypatch, name):
    from admmprune.recipes import parse_recipe
    from admmprune.runner import solve

    monkeypatch.setenv("ADMMPRUNE_DATA_DIR", str(tmp_path / "cache"))
    raw = {
        "problem": {"model": "lenet300", "data": "synthetic", "seed": 3},
        "data": {"synthetic_train": 512, "synthetic_test": 256},
        "dense": {"epochs": 1},
        **RECIPES[name],
    }
    report = solve(parse_recipe(raw, name=name), tmp_path / "out", plots=False)
    params = np.load(tmp_path / "out" / "params.npz")
    record = _clean({k: v for k, v in report.items() if k != "dense_cached"})
    record["params"] = hashlib.sha256(
        b"".join(k.encode() + params[k].tobytes() for k in sorted(params.files))
    ).hexdigest()
    _check(name, record)
