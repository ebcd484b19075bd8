"""Recipes with structured budgets: parsing, the budgets they build, their errors."""

from __future__ import annotations

import pytest

from admmprune.recipes import RecipeError, parse_recipe
from admmprune.structured import ChannelBudget, MacsBudget, NMBudget


def _recipe(budget: dict, solver: dict | None = None, model: str = "lenet300"):
    raw = {"problem": {"model": model, "data": "synthetic"}, "budget": budget}
    if solver is not None:
        raw["solver"] = solver
    return parse_recipe(raw, name="t")


def test_structured_budget_types_build_their_budgets() -> None:
    macs = _recipe({"type": "macs", "macs_fraction": 0.25}).budget_object()
    assert isinstance(macs, MacsBudget) and macs.capacity == 0.25 * 266200
    ch = _recipe({"type": "channels", "keep": 0.5}).budget_object()
    assert isinstance(ch, ChannelBudget) and ch.describe()["kept_channels"] == 200
    nm = _recipe({"type": "nm", "n": 2, "m": 4}).budget_object()
    assert isinstance(nm, NMBudget) and (nm.n, nm.m) == (2, 4)
    depth_free = _recipe({"type": "macs", "macs": 100000.0, "min_channels": 4}).budget_object()
    assert depth_free.min_channels == 4 and depth_free.capacity == 100000.0


def test_structured_recipe_as_dict_keeps_only_given_keys() -> None:
    d = _recipe({"type": "macs", "macs_fraction": 0.1}).as_dict()["budget"]
    assert d["type"] == "macs" and d["macs_fraction"] == 0.1
    assert "n" not in d and "units" not in d


def test_param_recipes_unchanged_by_the_structured_keys() -> None:
    d = _recipe({"keep": 0.02}).as_dict()["budget"]
    assert set(d) == {"keep", "count", "per_layer", "allocation", "energy_fraction", "energy"}


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ({"type": "macs", "macs_fraction": 0.25, "n": 2}, "not settings of type = 'macs'"),
        ({"type": "nm", "n": 2, "m": 4, "keep": 0.5}, "not settings of type = 'nm'"),
        ({"keep": 0.5, "macs_fraction": 0.5}, "structured budgets"),
        ({"type": "macs", "macs_fraction": 0.001}, "smallest reachable"),
        ({"type": "channels", "count": 1}, "at least 2"),
        ({"type": "nm", "n": 5, "m": 4}, "0 < N <= M"),
        ({"type": "macs", "units": "branches", "macs_fraction": 0.5}, "residual branches"),
    ],
)
def test_bad_structured_budgets_are_recipe_errors(budget: dict, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        _recipe(budget).budget_object()


def test_nm_with_m_not_dividing_a_layer_is_refused_before_training() -> None:
    with pytest.raises(RecipeError, match="not a multiple of M=4"):
        _recipe({"type": "nm", "n": 2, "m": 4}, model="lenet5")
    ok = _recipe({"type": "nm", "n": 2, "m": 4, "layers": ["fc1/kernel"]}, model="lenet5")
    assert ok.budget_object().layers == ("fc1/kernel",)


def test_ranking_methods_need_a_structured_budget() -> None:
    from admmprune.runner import validate

    with pytest.raises(RecipeError, match="ranks channels"):
        validate(_recipe({"keep": 0.1}, {"method": "l1_filter"}))
    validate(_recipe({"type": "macs", "macs_fraction": 0.5}, {"method": "structured_obs"}))
    scaled = _recipe({"type": "macs", "macs_fraction": 0.5}, {"method": "slimming"}).scaled(0.1)
    assert scaled.solver["sparsity_epochs"] == 1


def test_channel_energy_recipe_fits_the_energy_section_and_checks_its_keys():
    recipe = parse_recipe(
        {
            "problem": {"model": "lenet5", "data": "synthetic"},
            "budget": {"type": "channel_energy", "energy_fraction": 0.3, "samples": 16},
            "solver": {"method": "magnitude"},
        },
        name="ce",
    )
    d = recipe.budget_object().describe()
    assert d["type"] == "channel_energy" and d["energy_fraction"] == 0.3
    assert d["fit"]["samples"] == 16 and d["fit"]["r2"] > 0.9
    given = {k: v for k, v in recipe.as_dict()["budget"].items() if v is not None}
    assert given == {"type": "channel_energy", "energy_fraction": 0.3, "samples": 16}
    with pytest.raises(RecipeError, match="not settings of type = 'channel_energy'"):
        parse_recipe(
            {
                "problem": {"model": "lenet5", "data": "synthetic"},
                "budget": {"type": "channel_energy", "macs_fraction": 0.3},
                "solver": {"method": "magnitude"},
            },
            name="ce",
        )
