"""admmprune: neural-network pruning as constrained optimization, in JAX.

    minimize L(W)  subject to  W in S

``S`` is a budget (:class:`ParamBudget`); :func:`project` is the exact
Euclidean projection onto it; :class:`ADMM` solves the problem by ADMM
splitting, then hard-prunes and retrains with the mask fixed.
:class:`MagnitudePrune` and :class:`IterativeMagnitudePrune` are the
baselines in the same API.
"""

from admmprune._tree import apply_masks, default_prunable, leaf_names
from admmprune.admm import ADMM, AdmmState
from admmprune.baselines import IterativeMagnitudePrune, MagnitudePrune
from admmprune.budgets import Budget, BudgetError, ParamBudget
from admmprune.checkpoint import load_checkpoint, load_params, save_checkpoint, save_params
from admmprune.projections import project
from admmprune.results import LayerStats, PruneResult
from admmprune.training import train

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "AdmmState",
    "Budget",
    "BudgetError",
    "IterativeMagnitudePrune",
    "LayerStats",
    "MagnitudePrune",
    "ParamBudget",
    "PruneResult",
    "apply_masks",
    "default_prunable",
    "leaf_names",
    "load_checkpoint",
    "load_params",
    "project",
    "save_checkpoint",
    "save_params",
    "train",
]
