"""Recipes: one TOML file per pruning problem (model, data, budget, solver, epochs, seed).

A recipe is validated completely before anything runs: an unknown section or
key, a value of the wrong type, or a setting that does not belong to the
chosen method raises :class:`RecipeError` naming it (``solver.rho: expected a
number, got 'high'``). Example (``solvers/lenet300_admm_2pct.toml``)::

    [problem]
    model = "lenet300"
    data = "mnist"
    seed = 0

    [dense]
    epochs = 20

    [budget]
    keep = 0.02

    [solver]
    method = "admm"
    rho = 1e-4
    rho_growth = 1.15
    iterations = 60
    retrain_epochs = 20
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optax

from admmprune.budgets import Budget, ParamBudget
from admmprune.metrics import METRICS
from admmprune.models import INPUT_SHAPES, MODELS
from admmprune.oneshot import ONE_SHOT_METHODS

METHODS = (
    "admm",
    "magnitude",
    "iterative_magnitude",
    "projected_sgd",
    "oneshot",
    "l1_filter",
    "slimming",
    "structured_obs",
)
PRUNERS = ONE_SHOT_METHODS
OPTIMIZERS = ("adam", "sgd", "momentum", "adamw")
SCHEDULES = ("constant", "cosine")
STRUCTURED_TYPES = ("channels", "macs", "channel_energy", "nm")
BUDGET_TYPES = ("param", "energy", *STRUCTURED_TYPES)  # and "package.module:Name", a user's
# The keys each structured budget type takes (besides ``type``).
STRUCTURED_KEYS = {
    "channels": ("keep", "count", "per_layer", "allocation", "min_channels"),
    "macs": ("macs_fraction", "macs", "units", "min_channels", "round_to", "exact", "bound"),
    "channel_energy": (
        "energy_fraction",
        "energy",
        "min_channels",
        "round_to",
        "exact",
        "samples",
    ),
    "nm": ("n", "m", "layers"),
}
NEW_BUDGET_KEYS = (
    "macs_fraction",
    "macs",
    "units",
    "min_channels",
    "round_to",
    "exact",
    "bound",
    "n",
    "m",
    "layers",
    "samples",
)


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the offending key."""


_NUMBER = (int, float)


@dataclasses.dataclass(frozen=True)
class _Key:
    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    methods: tuple[str, ...] | None = None  # solver keys that only some methods take
    positive: bool = False  # strictly above ``minimum``
    import_path: bool = False  # besides the choices, a user's "package.module:Name"


def _k(
    types, default, choices=None, minimum=None, methods=None, positive=False, import_path=False
) -> _Key:
    types = types if isinstance(types, tuple) else (types,)
    return _Key(types, default, choices, minimum, methods, positive, import_path)


SCHEMA: dict[str, dict[str, _Key]] = {
    "problem": {
        "name": _k(str, None),
        # a built-in model, or a user's nnx model by import path ("mypkg.nets:ResNet8",
        # called with nnx.Rngs(seed)); a user model also needs input_shape
        "model": _k(str, None, choices=tuple(MODELS), import_path=True),
        # a built-in dataset, or a user's loader by import path ("mypkg.data:load", called
        # with no arguments, returning ((x_train, y_train), (x_test, y_test)) arrays)
        "data": _k(str, "mnist", choices=("mnist", "fashion_mnist", "synthetic"), import_path=True),
        "seed": _k(int, 0, minimum=0),
        "input_shape": _k(list, None),  # one example's shape, e.g. [32, 32, 3]
        # start from these trained params (a save_params .npz) instead of dense training
        "params": _k(str, ""),
    },
    "data": {
        "train_subset": _k(int, 0, minimum=0),  # 0 = all training examples
        "test_subset": _k(int, 0, minimum=0),
        "synthetic_train": _k(int, 2048, minimum=1),
        "synthetic_test": _k(int, 512, minimum=1),
        "idx_dir": _k(str, ""),
    },
    "dense": {
        "epochs": _k(int, 20, minimum=0),
        "optimizer": _k(str, "adam", choices=OPTIMIZERS),
        "learning_rate": _k(_NUMBER, 1e-3, minimum=0, positive=True),
        "batch_size": _k(int, 128, minimum=1),
        "cache": _k(bool, True),
        # stop when an epoch's loss exceeds this multiple of the starting loss (0: off)
        "divergence_factor": _k(_NUMBER, 100.0, minimum=0),
    },
    "budget": {
        "type": _k(str, None),  # "param", "energy" or "pkg.module:Name"; None: from the keys
        "keep": _k(_NUMBER, None),
        "count": _k(int, None),
        "per_layer": _k(dict, None),
        "allocation": _k(str, "global", choices=("global", "uniform")),
        "energy_fraction": _k(_NUMBER, None),  # of the dense network's energy
        "energy": _k(_NUMBER, None),  # absolute, in the energy model's units
        # structured budgets (type = "channels", "macs" or "nm")
        "macs_fraction": _k(_NUMBER, None),  # of the dense network's MACs per example
        "macs": _k(_NUMBER, None),
        "units": _k(str, None, choices=("channels", "branches")),
        "min_channels": _k(int, None, minimum=1),
        "round_to": _k(int, None, minimum=1),  # macs: kept counts multiples of this
        "exact": _k(bool, None),
        "bound": _k(bool, None),  # macs: report the LP bound and the projection's gap
        "n": _k(int, None, minimum=1),
        "m": _k(int, None, minimum=1),
        "layers": _k(list, None),  # nm: the kernels to constrain (default: every kernel)
        # channel_energy: configurations measured to fit ECC's bilinear model (default 64)
        "samples": _k(int, None, minimum=2),
    },
    "energy": {  # the energy model: energy budgets use it, every report states it
        "model": _k(str, "accelerator", choices=("accelerator", "linear")),
        "e_mac": _k(_NUMBER, 3.0, minimum=0),
        "e_mem": _k(_NUMBER, 200.0, minimum=0),
        "e_cache": _k(_NUMBER, 6.0, minimum=0),
        "e_rf": _k(_NUMBER, 1.0, minimum=0),
        "input_cache": _k(int, 51_200, minimum=0),
        "kernel_cache": _k(int, 4_096, minimum=0),
        "array_rows": _k(int, 12, minimum=1),
        "array_cols": _k(int, 14, minimum=1),
        "input_density": _k(dict, None),  # measured input nonzero fraction per layer
        "per_weight": _k(dict, None),  # model = "linear": cost per nonzero weight per layer
        "constant": _k(_NUMBER, 0.0, minimum=0),  # model = "linear"
        "projection": _k(str, "greedy", choices=("greedy", "exact")),
        "time_limit": _k(_NUMBER, 30.0, minimum=0, positive=True),  # exact projection
    },
    "solver": {
        "method": _k(str, "admm", choices=METHODS),
        # the W-step, projected SGD and retraining stop when a loss exceeds this multiple
        # of the phase's starting loss (0: only non-finite losses stop a run)
        "divergence_factor": _k(_NUMBER, 100.0, minimum=0),
        "optimizer": _k(str, "adam", choices=OPTIMIZERS),
        "learning_rate": _k(
            _NUMBER, 1e-3, minimum=0, positive=True, methods=("admm", "projected_sgd")
        ),
        "batch_size": _k(int, 128, minimum=1),
        "retrain_learning_rate": _k(_NUMBER, 1e-3, minimum=0, positive=True),
        "retrain_schedule": _k(str, "cosine", choices=SCHEDULES),
        "rho": _k(_NUMBER, 1e-4, minimum=0, positive=True, methods=("admm",)),
        "rho_growth": _k(_NUMBER, 1.15, minimum=1, methods=("admm",)),
        "rho_max": _k(_NUMBER, None, minimum=0, positive=True, methods=("admm",)),  # None: no cap
        "iterations": _k(int, 60, minimum=0, methods=("admm",)),
        "epochs_per_iteration": _k(int, 1, minimum=1, methods=("admm",)),
        "tol": _k(_NUMBER, 0.0, minimum=0, methods=("admm",)),  # 0 = run all iterations
        "metric": _k(str, "euclidean", choices=tuple(METRICS), methods=("admm",)),
        "decay_iterations": _k(int, 0, minimum=0, methods=("admm",)),
        # the W-step and retraining data-parallel over this many devices (0: one, -1: all)
        "devices": _k(int, 0, minimum=-1, methods=("admm",)),
        "retrain_epochs": _k(
            int,
            20,
            minimum=0,
            methods=(
                "admm",
                "magnitude",
                "projected_sgd",
                "oneshot",
                "l1_filter",
                "slimming",
                "structured_obs",
            ),
        ),  # oneshot: 0 unless given
        "sparsity_epochs": _k(int, 10, minimum=0, methods=("slimming",)),
        "l1": _k(_NUMBER, 1e-4, minimum=0, methods=("slimming",)),
        "hard_prune": _k(str, "zero", choices=("zero", "obs"), methods=("admm",)),
        "calibration_examples": _k(
            int, 4096, minimum=1, methods=("admm", "oneshot", "structured_obs")
        ),
        "damp": _k(_NUMBER, 0.01, minimum=0, methods=("admm", "oneshot", "structured_obs")),
        "pruner": _k(str, "exact_obs", choices=PRUNERS, methods=("oneshot",)),
        "layer_allocation": _k(
            str, "budget", choices=("budget", "obs"), methods=("oneshot", "admm")
        ),
        "block": _k(int, 128, minimum=1, methods=("oneshot",)),
        "nm": _k(list, None, methods=("oneshot",)),  # [n, m]: fast_obs/exact_obs pick N:M
        "curve_points": _k(int, 40, minimum=2, methods=("oneshot", "admm")),
        "fisher_examples": _k(int, 1024, minimum=1, methods=("oneshot",)),
        "fisher_block": _k(int, 128, minimum=1, methods=("oneshot",)),
        "fisher_damp": _k(_NUMBER, 1e-3, minimum=0, positive=True, methods=("oneshot",)),
        "fisher_steps": _k(int, 4, minimum=1, methods=("oneshot",)),
        "projected_epochs": _k(int, 30, minimum=0, methods=("projected_sgd",)),
        "project_every": _k(int, 10, minimum=1, methods=("projected_sgd",)),
        "decay_epochs": _k(int, 0, minimum=0, methods=("projected_sgd",)),  # 0: all
        "rounds": _k(int, 8, minimum=1, methods=("iterative_magnitude",)),
        "epochs_per_round": _k(int, 10, minimum=1, methods=("iterative_magnitude",)),
    },
}
REQUIRED = (("problem", "model"), ("budget", None))
BUDGET_KINDS = ("keep", "count", "per_layer", "energy_fraction", "energy")


def _type_name(types: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a table",
    }
    if set(types) == {int, float}:
        return "a number"
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_value(where: str, spec: _Key, value: Any) -> Any:
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if not ok:
        raise RecipeError(f"{where}: expected {_type_name(spec.types)}, got {value!r}.")
    if spec.choices is not None and value not in spec.choices:
        if spec.import_path and ":" in value:
            return value  # imported (and checked) when the recipe is parsed
        also = " or an import path like 'mypkg.mod:Name'" if spec.import_path else ""
        raise RecipeError(f"{where}: {value!r} is not one of {list(spec.choices)}{also}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where}: must be a finite number, got {value!r}.")
    if spec.minimum is not None and value < spec.minimum:
        raise RecipeError(f"{where}: must be >= {spec.minimum}, got {value!r}.")
    if spec.positive and value <= spec.minimum:
        raise RecipeError(f"{where}: must be > {spec.minimum}, got {value!r}.")
    return float(value) if float in spec.types and int in spec.types else value


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: every section with its defaults filled in."""

    problem: Mapping[str, Any]
    data: Mapping[str, Any]
    dense: Mapping[str, Any]
    budget: Mapping[str, Any]
    energy: Mapping[str, Any]
    solver: Mapping[str, Any]
    path: str | None = None

    @property
    def name(self) -> str:
        return self.problem["name"]

    @property
    def method(self) -> str:
        return self.solver["method"]

    def as_dict(self) -> dict[str, Any]:
        """The recipe as plain, JSON-ready sections (solver keys of other methods dropped)."""
        out = {s: dict(getattr(self, s)) for s in SCHEMA}
        out["solver"] = {k: v for k, v in out["solver"].items() if _applies(k, self.method)}
        for key in ("type", *NEW_BUDGET_KEYS):  # unset: as before the keys existed
            if out["budget"].get(key) is None:
                out["budget"].pop(key, None)
        if out["solver"].get("nm", 0) is None:
            out["solver"].pop("nm")
        for key, unset in (("input_shape", None), ("params", "")):  # as before they existed
            if out["problem"].get(key, unset) == unset:
                out["problem"].pop(key, None)
        return json.loads(json.dumps(out, default=str))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape: ``problem.input_shape``, else the built-in model's."""
        given = self.problem.get("input_shape")
        if given:
            return tuple(int(d) for d in given)
        return INPUT_SHAPES[self.problem["model"]]

    def network(self, seed: int | None = None) -> Any:
        """The recipe's nnx model (built-in or imported), seeded by ``problem.seed``."""
        from admmprune.models import build_model

        return build_model(self.problem["model"], self.problem["seed"] if seed is None else seed)

    def user_code_digest(self) -> dict[str, str]:
        """Hashes of what the recipe names outside itself: a user model's and data
        loader's source files, the starting params file (empty for built-ins)."""
        from admmprune.models import model_source_digest

        out = {}
        for key in ("model", "data"):
            path = self.problem[key]
            digest = model_source_digest(path, f"problem.{key}") if ":" in path else ""
            if digest:
                out[key] = digest
        if self.problem.get("params"):
            with open(self.problem["params"], "rb") as f:
                out["params"] = hashlib.sha256(f.read()).hexdigest()[:16]
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> Recipe:
        """A copy with ``{"section.key": value}`` overrides, validated like the file.

        A value of None unsets the key (its default applies).
        """
        method = overrides.get("solver.method", self.method)
        raw = _strip_none({s: dict(getattr(self, s)) for s in SCHEMA})
        raw["solver"] = {k: v for k, v in raw["solver"].items() if _applies(k, method)}
        if raw["budget"].get("allocation") == SCHEMA["budget"]["allocation"].default:
            del raw["budget"]["allocation"]  # a default, not a choice the file made
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in SCHEMA or not key:
                raise RecipeError(f"override {dotted!r}: expected 'section.key'.")
            raw[section][key] = value
        # An override to None unsets a key (e.g. swapping one kind of budget for another).
        return parse_recipe(_strip_none(raw), name=self.name, path=self.path)

    def scaled(self, factor: float) -> Recipe:
        """Every epoch count times ``factor`` (at least 1), for quick runs.

        ADMM's iterations and retraining, magnitude's retraining and
        iterative magnitude's epochs per round all scale by the same factor,
        so methods given equal epochs keep (nearly) equal epochs.
        """

        def f(v: int) -> int:
            return max(1, round(v * factor))

        s = self.solver
        out = {"dense.epochs": f(self.dense["epochs"]) if self.dense["epochs"] else 0}
        if self.method == "admm":
            out |= {
                "solver.iterations": f(s["iterations"]),
                "solver.retrain_epochs": f(s["retrain_epochs"]),
            }
            if s["decay_iterations"]:
                out["solver.decay_iterations"] = min(f(s["decay_iterations"]), f(s["iterations"]))
        elif self.method in ("magnitude", "l1_filter", "structured_obs"):
            out |= {"solver.retrain_epochs": f(s["retrain_epochs"])}
        elif self.method == "slimming":
            out |= {
                "solver.sparsity_epochs": f(s["sparsity_epochs"]),
                "solver.retrain_epochs": f(s["retrain_epochs"]),
            }
        elif self.method == "oneshot":
            if s["retrain_epochs"]:
                out |= {"solver.retrain_epochs": f(s["retrain_epochs"])}
        elif self.method == "projected_sgd":
            out |= {
                "solver.projected_epochs": f(s["projected_epochs"]),
                "solver.retrain_epochs": f(s["retrain_epochs"]),
            }
            if s["decay_epochs"]:
                out["solver.decay_epochs"] = f(s["decay_epochs"])
        else:
            out |= {"solver.epochs_per_round": f(s["epochs_per_round"])}
        return self.with_overrides(out)

    @property
    def is_energy(self) -> bool:
        """Whether the budget is an energy budget."""
        return self.budget_type == "energy"

    @property
    def budget_type(self) -> str:
        """``"param"``, ``"energy"`` or a user budget's import path (``pkg.mod:Name``)."""
        return _budget_type(self.budget)

    def energy_model(self) -> Any:
        """The ``[energy]`` section's model, built for this recipe's network."""
        from admmprune.energy import AcceleratorEnergy, LinearEnergy, layer_shapes
        from admmprune.models import init_model

        e, name = self.energy, self.problem["model"]
        try:
            if e["model"] == "linear":
                params, _ = init_model(name)
                return LinearEnergy.from_params(params, e["per_weight"], constant=e["constant"])
            shapes = layer_shapes(self.network(seed=0), self.input_shape, e["input_density"])
        except ValueError as err:
            raise RecipeError(f"[energy]: {err}") from None
        units = ("e_mac", "e_mem", "e_cache", "e_rf", "input_cache", "kernel_cache")
        units += ("array_rows", "array_cols")
        return AcceleratorEnergy(shapes, **{k: e[k] for k in units})

    def budget_object(self) -> Budget:
        """The budget this recipe describes: ``[budget] type`` through
        :data:`BUDGET_BUILDERS`, or a user's budget class (or function) named by
        import path, called with the section's other keys."""
        kind = self.budget_type
        if kind in BUDGET_BUILDERS:
            return BUDGET_BUILDERS[kind](self)
        settings = {k: v for k, v in self.budget.items() if k != "type"}
        try:
            return _import_path(kind)(**settings)
        except TypeError as e:
            raise RecipeError(f"[budget]: {kind} does not take {sorted(settings)}: {e}") from None

    def matches(self, recorded: Mapping[str, Any]) -> bool:
        """Whether ``recorded`` (a report's ``recipe``) describes this recipe.

        A key missing from ``recorded`` matches when this recipe has its
        default there: the report predates the key, and the default is
        what that run did.
        """
        mine = self.as_dict()
        if set(recorded) != set(mine):
            return False

        def default(section: str, key: str) -> Any:
            if key not in SCHEMA[section]:  # a user budget's own setting: no default
                return None
            return json.loads(json.dumps(SCHEMA[section][key].default, default=str))

        for section, values in mine.items():
            old = recorded[section]
            if set(old) - set(values):
                return False
            for key, value in values.items():
                if old.get(key, default(section, key)) != value:
                    return False
        return True

    def fingerprint(self) -> str:
        """A hash of the whole recipe (a checkpoint is only resumed by the recipe that wrote it)."""
        basis: dict[str, Any] = self.as_dict()
        code = self.user_code_digest()
        if code:  # an edited user model, loader or params file is another run
            basis = {**basis, "user_code": code}
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()

    def dense_key(self) -> str:
        """A hash of everything the dense model depends on (its cache key)."""
        basis = {
            "problem": {k: self.problem[k] for k in ("model", "data", "seed")},
            "data": dict(self.data),
            "dense": dict(self.dense),
        }
        for key in ("cache", "divergence_factor"):  # neither changes the trained network
            basis["dense"].pop(key, None)
        code = self.user_code_digest()
        if code:  # two user models (or versions of one) never share a cached network
            basis["user_code"] = code
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def _param_budget(recipe: Recipe) -> Budget:
    b = recipe.budget
    return ParamBudget(
        keep=b["keep"], count=b["count"], per_layer=b["per_layer"], allocation=b["allocation"]
    )


def _energy_budget(recipe: Recipe) -> Budget:
    from admmprune.energy_budget import EnergyBudget

    b = recipe.budget
    return EnergyBudget(
        recipe.energy_model(),
        fraction=b["energy_fraction"],
        energy=b["energy"],
        method=recipe.energy["projection"],
        time_limit=recipe.energy["time_limit"],
    )


def structure_of(recipe: Recipe) -> Any:
    """The channel and branch groups of the recipe's model (:func:`admmprune.groups.derive`)."""

    from admmprune.groups import derive

    return derive(recipe.network(), recipe.input_shape)


def _given(recipe: Recipe, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: recipe.budget[k] for k in keys if recipe.budget.get(k) is not None}


def _channel_budget(recipe: Recipe) -> Budget:
    from admmprune.structured import ChannelBudget

    return ChannelBudget(structure_of(recipe), **_given(recipe, STRUCTURED_KEYS["channels"]))


def _macs_budget(recipe: Recipe) -> Budget:
    from admmprune.structured import MacsBudget

    given = _given(recipe, STRUCTURED_KEYS["macs"])
    if "macs_fraction" in given:
        given["keep"] = given.pop("macs_fraction")
    return MacsBudget(structure_of(recipe), **given)


def _channel_energy_budget(recipe: Recipe) -> Budget:
    """ECC's setting: the ``[energy]`` model, fitted bilinear in channel counts."""
    from admmprune.models import init_model
    from admmprune.structured import ChannelEnergyBudget, fit_channel_energy

    given = _given(recipe, STRUCTURED_KEYS["channel_energy"])
    structure = structure_of(recipe)
    params, _ = init_model(recipe.problem["model"])
    model, fit = fit_channel_energy(
        structure,
        recipe.energy_model(),
        params,
        samples=given.pop("samples", 64),
        seed=recipe.problem["seed"],
        min_channels=given.get("min_channels", 1),
    )
    if "energy_fraction" in given:
        given["keep"] = given.pop("energy_fraction")
    if "energy" in given:
        given["macs"] = given.pop("energy")
    return ChannelEnergyBudget(structure, model=model, fit=fit, **given)


def _nm_budget(recipe: Recipe) -> Budget:
    from admmprune.structured import NMBudget

    return NMBudget(**_given(recipe, STRUCTURED_KEYS["nm"]))


BUDGET_BUILDERS: dict[str, Callable[[Recipe], Budget]] = {
    "param": _param_budget,
    "energy": _energy_budget,
    "channels": _channel_budget,
    "macs": _macs_budget,
    "channel_energy": _channel_energy_budget,
    "nm": _nm_budget,
}


def _budget_type(budget: Mapping[str, Any]) -> str:
    if budget.get("type"):
        return budget["type"]
    energy = budget.get("energy_fraction") is not None or budget.get("energy") is not None
    return "energy" if energy else "param"


def _import_path(path: str) -> Any:
    """``"package.module:Name"`` -> the object, or a :class:`RecipeError` saying why not."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise RecipeError(
            f"budget.type: {path!r} is not one of {list(BUDGET_TYPES)} nor an import path "
            "like 'mypkg.budgets:RowTopK'."
        )
    from admmprune.models import ModelError, import_object

    try:
        return import_object(path, "budget.type")
    except ModelError as e:
        raise RecipeError(str(e)) from None


def _check_problem(problem: Mapping[str, Any]) -> None:
    """A user's model, loader and params named by the recipe exist and fit together."""
    from admmprune.models import ModelError, build_model, import_object

    model = problem["model"]
    shape = problem.get("input_shape")
    if shape is not None and (
        not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise RecipeError(
            f"problem.input_shape: expected one example's shape as positive integers, e.g. "
            f"[32, 32, 3], got {shape!r}."
        )
    try:
        if ":" in model:
            if shape is None:
                raise RecipeError(
                    f"problem.input_shape: the user model {model!r} needs the shape of one "
                    "input example, e.g. input_shape = [32, 32, 3]."
                )
            build_model(model, problem["seed"])
        if ":" in problem["data"]:
            import_object(problem["data"], "problem.data")
    except ModelError as e:
        raise RecipeError(str(e)) from None
    if problem.get("params") and not Path(problem["params"]).is_file():
        raise RecipeError(
            f"problem.params: {problem['params']!r} is not a file; give the .npz that "
            "admmprune.save_params wrote for this model."
        )


def _applies(key: str, method: str) -> bool:
    methods = SCHEMA["solver"][key].methods
    return methods is None or method in methods


def _strip_none(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s: {k: v for k, v in d.items() if v is not None} for s, d in raw.items()}


def parse_recipe(raw: Mapping[str, Any], *, name: str, path: str | None = None) -> Recipe:
    """Validates a recipe's tables (as parsed from TOML) and fills in defaults."""
    for section in raw:
        if section not in SCHEMA:
            raise RecipeError(
                f"unknown section [{section}]; recipes have {[f'[{s}]' for s in SCHEMA]}."
            )
    for section, key in REQUIRED:
        if section not in raw or (key is not None and key not in raw[section]):
            raise RecipeError(f"missing {section + '.' + key if key else f'[{section}]'}.")
    method = raw.get("solver", {}).get("method", "admm")
    if method not in METHODS:
        raise RecipeError(f"solver.method: {method!r} is not one of {list(METHODS)}.")
    parsed: dict[str, dict[str, Any]] = {}
    custom = _custom_budget(raw.get("budget", {}))
    for section, keys in SCHEMA.items():
        table = raw.get(section, {})
        if not isinstance(table, Mapping):
            raise RecipeError(f"[{section}] must be a table, got {table!r}.")
        if section == "budget" and custom:
            parsed[section] = dict(table)  # a user budget's settings are its own to check
            continue
        out = {}
        for key, value in table.items():
            where = f"{section}.{key}"
            if key not in keys:
                raise RecipeError(f"{where}: unknown key; [{section}] takes {sorted(keys)}.")
            spec = keys[key]
            if spec.methods is not None and method not in spec.methods:
                raise RecipeError(
                    f"{where}: not a setting of method {method!r} (it applies to "
                    f"{list(spec.methods)})."
                )
            out[key] = _check_value(where, spec, value)
        for key, spec in keys.items():
            if key not in out and (section != "solver" or _applies(key, method)):
                out[key] = spec.default
        if section == "solver" and method == "oneshot" and "retrain_epochs" not in table:
            out["retrain_epochs"] = 0  # one-shot means no retraining unless asked
        parsed[section] = out
    parsed["problem"]["name"] = parsed["problem"]["name"] or name
    _check_problem(parsed["problem"])
    for section in ("dense", "solver"):
        factor = parsed[section].get("divergence_factor")
        if factor is not None and 0 < factor <= 1:
            raise RecipeError(
                f"{section}.divergence_factor: {factor} would stop any run whose loss ever "
                "rises; use a number above 1 (default 100) or 0 to turn the check off."
            )
    if custom:
        _check_energy_section(parsed["energy"])
        recipe = Recipe(**parsed, path=path)
        recipe.budget_object()  # a user budget's own checks of its settings, before any work
        return recipe
    kind = parsed["budget"]["type"]
    if kind in STRUCTURED_TYPES:
        return _structured_recipe(parsed, raw, kind, path)
    extra = [k for k in NEW_BUDGET_KEYS if parsed["budget"][k] is not None]
    if extra:
        raise RecipeError(
            f"[budget] {extra}: settings of the structured budgets; give type = "
            f"{' or '.join(repr(t) for t in STRUCTURED_TYPES)}."
        )
    given = [k for k in BUDGET_KINDS if parsed["budget"][k] is not None]
    if kind is not None and kind != _budget_type({**parsed["budget"], "type": None}):
        raise RecipeError(
            f"budget.type: {kind!r} does not match the keys given ({given}); "
            "param budgets take keep, count or per_layer, energy budgets energy_fraction "
            "or energy."
        )
    if len(given) != 1:
        raise RecipeError(
            "[budget] takes exactly one of keep, count, per_layer, energy_fraction or energy "
            f"(got {given or 'none'})."
        )
    if given[0] not in ("keep", "count") and "allocation" in raw.get("budget", {}):
        raise RecipeError(f"budget.allocation: applies to keep and count, not to {given[0]}.")
    f = parsed["budget"]["energy_fraction"]
    if f is not None and not 0 < f <= 1:
        raise RecipeError(f"budget.energy_fraction: must be in (0, 1], got {f}.")
    e = parsed["budget"]["energy"]
    if e is not None and e <= 0:
        raise RecipeError(f"budget.energy: must be positive, got {e}.")
    _check_energy_section(parsed["energy"])
    if parsed["budget"]["keep"] is not None and not 0 <= parsed["budget"]["keep"] <= 1:
        raise RecipeError(f"budget.keep: must be in [0, 1], got {parsed['budget']['keep']}.")
    if parsed["budget"]["count"] is not None and parsed["budget"]["count"] < 0:
        raise RecipeError(f"budget.count: must be >= 0, got {parsed['budget']['count']}.")
    return Recipe(**parsed, path=path)


def _structured_recipe(
    parsed: dict[str, dict[str, Any]], raw: Mapping[str, Any], kind: str, path: str | None
) -> Recipe:
    """A recipe with a structured budget: its keys checked, the budget built (errors early)."""
    from admmprune.budgets import BudgetError

    allowed = set(STRUCTURED_KEYS[kind]) | {"type"}
    wrong = sorted(set(raw.get("budget", {})) - allowed)
    if wrong:
        raise RecipeError(
            f"[budget] {wrong}: not settings of type = {kind!r}, which takes "
            f"{sorted(STRUCTURED_KEYS[kind])}."
        )
    given = {k: v for k, v in parsed["budget"].items() if k in raw["budget"]}
    parsed["budget"] = {k: None for k in SCHEMA["budget"]} | given
    if kind == "channels":
        parsed["budget"]["allocation"] = given.get("allocation", "global")
    _check_energy_section(parsed["energy"])
    recipe = Recipe(**parsed, path=path)
    try:  # built and checked against the network now: a bad budget fails before any work
        from admmprune.models import init_model

        recipe.budget_object().check(init_model(parsed["problem"]["model"])[0])
    except BudgetError as e:
        raise RecipeError(f"[budget]: {e}") from None
    return recipe


def _custom_budget(table: Any) -> bool:
    """Whether ``[budget]`` names a user's budget by import path."""
    if not isinstance(table, Mapping) or "type" not in table:
        return False
    kind = table["type"]
    if not isinstance(kind, str):
        raise RecipeError(f"budget.type: expected a string, got {kind!r}.")
    if kind in BUDGET_TYPES:
        return False
    _import_path(kind)  # a RecipeError unless it is an import path that loads
    return True


def _check_energy_section(energy: Mapping[str, Any]) -> None:
    if energy["model"] == "linear" and not energy["per_weight"]:
        raise RecipeError(
            'energy.per_weight: model = "linear" needs a table of cost per nonzero weight, '
            'e.g. per_weight = { "fc1/kernel" = 210.0 }.'
        )
    if energy["model"] != "linear" and energy["per_weight"] is not None:
        raise RecipeError('energy.per_weight: only for model = "linear".')


def load_recipe(path: str | Path) -> Recipe:
    """Reads and validates a TOML recipe file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise RecipeError(f"{path}: no such recipe file.") from e
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e}).") from e
    try:
        return parse_recipe(raw, name=path.stem, path=str(path))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def make_optimizer(
    name: str, learning_rate: float | optax.Schedule
) -> optax.GradientTransformation:
    """The recipe's optimizer names as optax transformations."""
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=1e-4)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9, nesterov=True)
    return optax.sgd(learning_rate)


def retrain_learning_rate(recipe: Recipe, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """Constant, or cosine-decayed over one retraining phase of ``epochs`` epochs."""
    lr = recipe.solver["retrain_learning_rate"]
    if recipe.solver["retrain_schedule"] == "constant" or epochs == 0:
        return optax.constant_schedule(lr)
    return optax.cosine_decay_schedule(lr, max(1, epochs * steps_per_epoch))
