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
    ],
)
def test_invalid_budget_is_rejected_at_construction(kwargs, words):
    with pytest.raises(BudgetError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ParamBudget(**kwargs)


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
