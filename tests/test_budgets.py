"""Budget validation: every invalid budget fails with a message naming the fix."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from admmprune import BudgetError, ParamBudget

TREE = {
    "fc1": {"kernel": np.zeros((10, 5)), "bias": np.zeros(5)},
    "fc2": {"kernel": np.zeros((5, 2)), "bias": np.zeros(2)},
}  # 60 prunable weights


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"keep": -0.1}, "keep must be a fraction in [0, 1]"),
        ({"keep": 1.5}, "keep must be a fraction in [0, 1]"),
        ({"count": -3}, "count must be >= 0"),
        ({"count": 2.5}, "count must be an integer"),
        ({}, "exactly one of"),
        ({"keep": 0.1, "count": 3}, "exactly one of"),
        ({"keep": 0.1, "allocation": "layerwise"}, "allocation must be"),
        ({"per_layer": {}}, "per_layer is empty"),
        ({"per_layer": {"fc1": -1}}, "must be >= 0"),
        ({"per_layer": {"fc1": 1.2}}, "fraction in [0, 1]"),
        ({"keep": 0}, "keep=0 is an empty budget"),
        ({"keep": 0.0}, "keep=0 is an empty budget"),
        ({"count": 0}, "count=0 is an empty budget"),
    ],
)
def test_invalid_budget_is_rejected_at_construction(kwargs, words):
    with pytest.raises(BudgetError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ParamBudget(**kwargs)


def test_a_budget_that_rounds_to_nothing_names_the_smallest_one():
    with pytest.raises(BudgetError, match=r"rounds to 0 of the 60 .* keep=0.0167 \(count=1\)"):
        ParamBudget(keep=0.001).check(TREE)
    with pytest.raises(BudgetError, match="per_layer keeps no weight"):
        ParamBudget(per_layer={"fc1": 0, "fc2": 0.0}).check(TREE)


def test_count_above_prunable_weights_names_the_limit():
    with pytest.raises(BudgetError, match=r"count=61 exceeds the 60 prunable weights"):
        ParamBudget(count=61).mask(TREE)


def test_per_layer_key_matching_nothing_lists_the_leaves():
    with pytest.raises(BudgetError, match=r"'fc3' matches no prunable leaf.*fc1/kernel"):
        ParamBudget(per_layer={"fc3": 0.1}).mask(TREE)


def test_per_layer_count_above_layer_size():
    with pytest.raises(BudgetError, match=r"use at most 10"):
        ParamBudget(per_layer={"fc2": 11}).mask(TREE)


def test_per_layer_overlapping_keys():
    with pytest.raises(BudgetError, match="more than one per_layer key"):
        ParamBudget(per_layer={"fc1": 0.5, "fc1/kernel": 3}).mask(TREE)


def test_no_prunable_leaves():
    with pytest.raises(BudgetError, match="no prunable leaves"):
        ParamBudget(keep=0.5).mask({"b": np.zeros(3)})


@pytest.mark.parametrize(
    "budget",
    [
        ParamBudget(keep=0.05),
        ParamBudget(count=7, allocation="uniform"),
        ParamBudget(per_layer={"fc1": 0.1, "fc2": 3}),
    ],
)
def test_relax_runs_from_dense_to_target(budget):
    counts = [
        sum(int(np.asarray(m).sum()) for m in _kernels(budget.relax(t).mask(TREE)))
        for t in np.linspace(0, 1, 6)
    ]
    target = sum(int(np.asarray(m).sum()) for m in _kernels(budget.mask(TREE)))
    assert counts[0] == 60
    assert counts[-1] == target
    assert all(a >= b for a, b in itertools.pairwise(counts))


def _kernels(masks):
    return [masks[layer]["kernel"] for layer in masks]


def test_describe_is_json_ready():
    import json

    d = ParamBudget(per_layer={"fc1": 0.1}).describe()
    assert json.loads(json.dumps(d)) == {
        "type": "param",
        "allocation": "global",
        "per_layer": {"fc1": 0.1},
    }


def test_numpy_fractions_and_hashing():
    b = ParamBudget(per_layer={"fc1": np.float32(0.5), "fc2": np.int64(3)})
    masks = b.mask(TREE)
    assert int(np.asarray(masks["fc1"]["kernel"]).sum()) == 25  # a fraction, not a count of 0
    assert int(np.asarray(masks["fc2"]["kernel"]).sum()) == 3
    assert hash(b) == hash(ParamBudget(per_layer={"fc2": 3, "fc1": 0.5}))


def test_per_layer_constrains_only_the_named_leaves():
    b = ParamBudget(per_layer={"fc2": 3})
    assert b.prunable(TREE) == [False, False, False, True]  # fc1/bias, fc1/kernel, fc2/...
    with pytest.raises(BudgetError, match="per_layer= already says where"):
        ParamBudget(per_layer={"fc2": 3}, allocation="uniform")


# ---------------------------------------------------------------------------
# A budget defined outside the library: the protocol is the whole seam.


class RowTopK:
    """Keep the ``k`` largest weights of every row (output unit) of every kernel.

    For a flax ``(in, out)`` kernel a row of the layer matrix ``W`` is a
    column of the kernel; the Euclidean projection keeps each column's ``k``
    largest magnitudes. Its figure is the largest row count of a network.
    """

    def __init__(self, k: int, progress: float = 1.0) -> None:
        if not isinstance(k, int) or k < 0:
            raise BudgetError(f"RowTopK: k must be a non-negative integer, got {k!r}.")
        self.k, self.progress = k, progress

    def prunable(self, params):
        import jax

        return [np.ndim(a) == 2 for a in jax.tree.leaves(params)]

    def _k(self, rows_in: int) -> int:
        return round(rows_in * (self.k / rows_in) ** self.progress) if self.k else 0

    def project(self, params):
        import jax
        import jax.numpy as jnp

        from admmprune import Projection

        def mask(a, f):
            if not f:
                return jnp.ones(np.shape(a), bool)
            k = self._k(a.shape[0])
            order = jnp.argsort(-jnp.abs(a), axis=0, stable=True)
            rank = jnp.argsort(order, axis=0, stable=True)
            return rank < k

        leaves, treedef = jax.tree.flatten(params)
        flags = self.prunable(params)
        masks = [mask(a, f) for a, f in zip(leaves, flags, strict=True)]
        projected = [jnp.where(m, a, 0) for a, m in zip(leaves, masks, strict=True)]
        return Projection(jax.tree.unflatten(treedef, masks), self.measure(projected))

    def measure(self, params):
        import jax

        rows = [
            int(np.max(np.count_nonzero(np.asarray(a), axis=0)))
            for a, f in zip(jax.tree.leaves(params), self.prunable(params), strict=True)
            if f
        ]
        return {"max_row_nonzero": float(max(rows))}

    def check(self, params):
        import jax

        smallest = min(
            a.shape[0]
            for a, f in zip(jax.tree.leaves(params), self.prunable(params), strict=True)
            if f
        )
        if self.k > smallest:
            raise BudgetError(f"RowTopK: k={self.k} exceeds the {smallest} inputs; use k <= it.")

    def relax(self, t):
        return RowTopK(self.k, float(t))

    def pricing(self, params):
        raise BudgetError("RowTopK fixes every row's count; there is no total to divide.")

    def describe(self):
        return {"type": "row_topk", "k": self.k}


def _row_problem():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from admmprune.data import synthetic_classification
    from admmprune.models import cross_entropy_loss, split_nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(12, 16, rngs=rngs)
            self.fc2 = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    data = synthetic_classification(256, dim=12, classes=3, seed=1)
    model = Net(nnx.Rngs(0))
    params, apply = split_nnx(model)
    return model, params, cross_entropy_loss(apply), (jnp.asarray(data.x), jnp.asarray(data.y))


def _rows_within(params, k):
    import jax

    for a in jax.tree.leaves(params):
        if np.ndim(a) == 2:
            assert np.count_nonzero(np.asarray(a), axis=0).max() <= k


def test_a_budget_defined_outside_the_library_runs_through_every_solver():
    import jax
    import optax

    import admmprune

    model, params, loss, data = _row_problem()
    budget = RowTopK(3)
    assert isinstance(budget, admmprune.Budget)  # the runtime protocol: nothing more needed
    budget.check(params)
    with pytest.raises(BudgetError, match="k=20 exceeds"):
        RowTopK(20).check(params)
    opt = optax.adam(1e-2)
    finetune = admmprune.Finetune(epochs=1)
    solvers = {
        "admm": admmprune.ADMM(
            budget, opt, rho=1e-3, iterations=2, finetune=finetune, batch_size=64
        ),
        "magnitude": admmprune.MagnitudePrune(budget, opt, finetune=finetune, batch_size=64),
        "projected_sgd": admmprune.ProjectedSGD(
            budget, opt, projected_epochs=2, finetune=finetune, batch_size=64
        ),
        "oneshot_refit": admmprune.OneShotPrune(
            budget, model, method="refit", calibration_examples=128
        ),
    }
    for name, solver in solvers.items():
        res = solver.run(params, loss, data, key=jax.random.key(0))
        _rows_within(res.params, 3)
        assert res.nonzero_weights == 3 * 16 + 3 * 3, name  # every row keeps exactly k
        assert res.budget == {"type": "row_topk", "k": 3}, name
        assert admmprune.in_budget(res.params, budget), name
    admm = solvers["admm"].run(params, loss, data, key=jax.random.key(0))
    assert admm.records("admm")[-1]["max_row_nonzero"] == 3.0  # the budget's figure of Z
    psgd = solvers["projected_sgd"].run(params, loss, data, key=jax.random.key(0))
    assert "max_row_nonzero" in psgd.records("projected")[-1]
    # An OBS pruner that chooses its own masks at per-layer counts cannot honour per-row
    # counts: it is refused rather than returning a network outside the set.
    with pytest.raises(BudgetError, match="method='refit'"):
        admmprune.OneShotPrune(budget, model, method="exact_obs", calibration_examples=128).run(
            params, loss, data, key=jax.random.key(0)
        )
    with pytest.raises(BudgetError, match="no total to divide"):
        admmprune.OneShotPrune(budget, model, allocation="obs", calibration_examples=128).run(
            params, loss, data, key=jax.random.key(0)
        )


def test_a_recipe_reaches_a_user_budget_by_import_path(tmp_path, monkeypatch):
    from admmprune.recipes import RecipeError, parse_recipe
    from admmprune.runner import solve

    monkeypatch.setenv("ADMMPRUNE_DATA_DIR", str(tmp_path / "cache"))
    raw = {
        "problem": {"model": "lenet300", "data": "synthetic", "seed": 0},
        "data": {"synthetic_train": 256, "synthetic_test": 128},
        "dense": {"epochs": 1},
        "budget": {"type": "test_budgets:RowTopK", "k": 4},
        "solver": {"method": "admm", "iterations": 1, "retrain_epochs": 1},
    }
    recipe = parse_recipe(raw, name="row_topk")
    assert isinstance(recipe.budget_object(), RowTopK)
    report = solve(recipe, tmp_path / "out", plots=False)
    assert report["budget"] == {"type": "row_topk", "k": 4}
    assert report["nonzero_weights"] == 4 * (300 + 100 + 10)
    assert report["recipe"]["budget"] == {"type": "test_budgets:RowTopK", "k": 4}
    with pytest.raises(RecipeError, match=r"cannot import 'nowhere\.mod:Nope'"):
        parse_recipe({**raw, "budget": {"type": "nowhere.mod:Nope"}}, name="x")
    with pytest.raises(RecipeError, match="not one of"):
        parse_recipe({**raw, "budget": {"type": "rows"}}, name="x")
    with pytest.raises(RecipeError, match="does not take"):
        parse_recipe({**raw, "budget": {"type": "test_budgets:RowTopK", "kk": 4}}, name="x")
    with pytest.raises(BudgetError, match="k=400 exceeds"):
        from admmprune.runner import validate

        validate(
            parse_recipe({**raw, "budget": {"type": "test_budgets:RowTopK", "k": 400}}, name="x")
        )
