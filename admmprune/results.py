"""The record every pruning solver returns."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from admmprune._tree import PyTree, leaf_names


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Sparsity of one prunable leaf."""

    name: str
    shape: tuple[int, ...]
    size: int
    nonzero: int

    @property
    def kept_fraction(self) -> float:
        return self.nonzero / self.size if self.size else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "size": self.size,
            "nonzero": self.nonzero,
            "kept_fraction": self.kept_fraction,
        }


def layer_stats(params: PyTree, flags: list[bool]) -> tuple[LayerStats, ...]:
    """Nonzero counts of the prunable leaves of ``params`` (``flags`` selects them)."""
    names = leaf_names(params)
    out = []
    for name, leaf, f in zip(names, jax.tree.leaves(params), flags, strict=True):
        if f:
            a = np.asarray(leaf)
            out.append(LayerStats(name, tuple(a.shape), int(a.size), int(np.count_nonzero(a))))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """What a pruning run returns.

    Attributes:
        params: the pruned (and retrained) parameters; pruned entries are 0.
        masks: boolean pytree, True where a weight is kept.
        layers: per-prunable-leaf sparsity.
        history: one dict per epoch or ADMM iteration, in order; each has a
            ``phase`` (``"admm"``, ``"prune"``, ``"retrain"``, ...) and its
            figures (``loss``, residuals, ``rho``, evaluation metrics).
        method: the solver's name.
        budget: the budget's description.
        wall_seconds: wall-clock time of the run.
        converged: for ADMM, whether the residual tolerance was met (None
            when no tolerance was set or the method has no such notion).
        epochs: training epochs the run spent (W-steps plus retraining).
        state: the solver's final state (for ADMM, an :class:`AdmmState`).
    """

    params: PyTree
    masks: PyTree
    layers: tuple[LayerStats, ...]
    history: list[dict[str, Any]]
    method: str
    budget: dict[str, Any]
    wall_seconds: float
    epochs: int
    converged: bool | None = None
    state: Any = None

    @property
    def prunable_weights(self) -> int:
        return sum(s.size for s in self.layers)

    @property
    def nonzero_weights(self) -> int:
        return sum(s.nonzero for s in self.layers)

    @property
    def kept_fraction(self) -> float:
        total = self.prunable_weights
        return self.nonzero_weights / total if total else 0.0

    def records(self, phase: str) -> list[dict[str, Any]]:
        """The history records of one phase."""
        return [r for r in self.history if r.get("phase") == phase]

    def summary(self) -> str:
        """A per-layer table and the totals, for printing."""
        lines = [f"{'layer':<28} {'shape':<18} {'nonzero':>10} {'kept':>8}"]
        for s in self.layers:
            shape = "x".join(map(str, s.shape))
            lines.append(f"{s.name:<28} {shape:<18} {s.nonzero:>10d} {s.kept_fraction:>8.2%}")
        lines.append(
            f"{'total':<28} {'':<18} {self.nonzero_weights:>10d} {self.kept_fraction:>8.2%}"
            f"   ({self.prunable_weights / max(self.nonzero_weights, 1):.1f}x compression)"
        )
        return "\n".join(lines)


def with_eval(
    record: dict[str, Any],
    params: PyTree,
    eval_fn: Callable[[PyTree], Mapping[str, float]] | None,
    prefix: str = "",
) -> dict[str, Any]:
    """Adds ``eval_fn(params)``'s figures (keys prefixed) to ``record``; returns it."""
    if eval_fn is not None:
        record.update({prefix + k: float(v) for k, v in eval_fn(params).items()})
    return record


def finish(
    *,
    params: PyTree,
    masks: PyTree,
    budget: Any,
    history: list[dict[str, Any]],
    method: str,
    start: float,
    epochs: int,
    converged: bool | None = None,
    state: Any = None,
) -> PruneResult:
    """Builds a solver's :class:`PruneResult`; ``start`` is its ``time.perf_counter()``.

    Raises:
        DivergenceError: when the result holds a non-finite value.
    """
    from admmprune.guards import check_result

    check_result(params, method)
    return PruneResult(
        params=params,
        masks=masks,
        layers=layer_stats(params, budget.prunable(params)),
        history=history,
        method=method,
        budget=budget.describe(),
        wall_seconds=time.perf_counter() - start,
        epochs=epochs,
        converged=converged,
        state=state,
    )
