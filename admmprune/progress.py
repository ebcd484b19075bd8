"""The progress bar of a run: a tqdm bar over its epochs, fed by history records."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A tqdm bar over a run's epochs, fed by the solvers' history records."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=desc, unit="epoch", dynamic_ncols=True, file=sys.stderr
            )

    def __call__(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        phase = record.get("phase")
        if phase in ("dense", "admm", "retrain", "projected"):
            self.bar.update(1)
        post = {"phase": phase}
        if "iteration" in record and phase == "admm":
            post["it"] = record["iteration"]
        for key, label in (
            ("loss", "loss"),
            ("primal_relative", "r"),
            ("dual_relative", "s"),
            ("accuracy", "acc"),
        ):
            if key in record:
                post[label] = f"{record[key]:.4g}"
        self.bar.set_postfix(post, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def total_epochs(recipe: Any) -> int:
    """Epochs the run will train: dense (unless cached) plus the solver's own."""
    from admmprune.runner import dense_cache_path, make_solver

    cached = recipe.dense["cache"] and dense_cache_path(recipe).exists()
    dense = 0 if cached else recipe.dense["epochs"]
    return dense + make_solver(recipe, steps_per_epoch=1).epochs


__all__ = ["Progress", "total_epochs"]
