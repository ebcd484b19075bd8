"""admmprune: neural-network pruning as constrained optimization, in JAX.

    minimize L(W)  subject to  W in S

``S`` is a budget: :class:`ParamBudget` (nonzero weights) or
:class:`EnergyBudget` (the energy of an :class:`AcceleratorEnergy` or
:class:`LinearEnergy` model). :func:`project` is the Euclidean projection onto
it (exact top-k; a knapsack for energy); :class:`ADMM` solves the problem by
ADMM splitting, then hard-prunes and retrains with the mask fixed.
:class:`MagnitudePrune`, :class:`IterativeMagnitudePrune` and
:class:`ProjectedSGD` are the baselines in the same API.
:class:`OneShotPrune` prunes a trained network in one shot with second-order
(OBS) compensation from calibration data (:mod:`admmprune.obs`, layer-wise;
:mod:`admmprune.woodfisher`, global); :func:`admmprune.obs.compensator` gives
ADMM's hard prune the same compensation.
"""

from admmprune._tree import apply_masks, default_prunable, leaf_names
from admmprune.admm import ADMM, AdmmState, BudgetRamp, GeometricRho
from admmprune.baselines import IterativeMagnitudePrune, MagnitudePrune, ProjectedSGD
from admmprune.bilinear import BilinearEnergy
from admmprune.budgets import (
    Budget,
    BudgetError,
    LayerAllocation,
    ParamBudget,
    Pricing,
    Projection,
    in_budget,
)
from admmprune.checkpoint import (
    CheckpointError,
    RunCheckpoint,
    load_checkpoint,
    load_params,
    save_checkpoint,
    save_params,
)
from admmprune.energy import AcceleratorEnergy, LinearEnergy
from admmprune.energy_budget import EnergyBudget
from admmprune.finetune import Finetune
from admmprune.guards import DivergenceError, InputError, RunFailedError
from admmprune.knapsack import KnapsackStats, exact_knapsack, greedy_knapsack
from admmprune.layers import layer_shapes
from admmprune.metrics import DiagFisher, Euclidean, Fisher
from admmprune.oneshot import OneShotPrune, obs_allocation
from admmprune.projections import project
from admmprune.results import LayerStats, PruneResult
from admmprune.training import train

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "AcceleratorEnergy",
    "AdmmState",
    "BilinearEnergy",
    "Budget",
    "BudgetError",
    "BudgetRamp",
    "CheckpointError",
    "DiagFisher",
    "DivergenceError",
    "EnergyBudget",
    "Euclidean",
    "Finetune",
    "Fisher",
    "GeometricRho",
    "InputError",
    "IterativeMagnitudePrune",
    "KnapsackStats",
    "LayerAllocation",
    "LayerStats",
    "LinearEnergy",
    "MagnitudePrune",
    "OneShotPrune",
    "ParamBudget",
    "Pricing",
    "ProjectedSGD",
    "Projection",
    "PruneResult",
    "RunCheckpoint",
    "RunFailedError",
    "apply_masks",
    "default_prunable",
    "exact_knapsack",
    "greedy_knapsack",
    "in_budget",
    "layer_shapes",
    "leaf_names",
    "load_checkpoint",
    "load_params",
    "obs_allocation",
    "project",
    "save_checkpoint",
    "save_params",
    "train",
]


def __getattr__(name: str) -> object:
    """``admmprune.nnx`` (the flax adapter) after a plain ``import admmprune``, loaded
    only when first used: importing the package stays free of flax."""
    if name == "nnx":
        import importlib

        return importlib.import_module("admmprune.nnx")
    raise AttributeError(f"module 'admmprune' has no attribute {name!r}")
