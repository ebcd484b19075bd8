"""ECC's energy model (Yang et al., CVPR 2019): bilinear in adjacent layers' kept channels.

    E(s) = b0 + sum_j a_j s_{j-1} s_j,

fitted to measured (configuration, energy) pairs by bounded least squares.

References:
    H. Yang et al., "ECC: Platform-Independent Energy-Constrained Deep Neural
    Network Compression via a Bilinear Regression Model", CVPR 2019.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from admmprune._tree import PyTree, leaf_names


def kept_channels(params: PyTree, names: Sequence[str]) -> np.ndarray:
    """Fraction of output channels (last kernel axis) with any nonzero weight, per layer."""
    leaves = dict(zip(leaf_names(params), jax.tree.leaves(params), strict=True))
    out = []
    for n in names:
        if n not in leaves:
            raise KeyError(f"{n} is not a leaf of params; leaves are {sorted(leaves)}.")
        a = np.asarray(leaves[n])
        alive = np.any(a.reshape(-1, a.shape[-1]) != 0, axis=0)
        out.append(float(alive.mean()))
    return np.asarray(out)


@dataclasses.dataclass(frozen=True)
class BilinearFit:
    """How well a :class:`BilinearEnergy` fits its samples.

    Attributes:
        r2: coefficient of determination on the samples.
        rmse: root mean squared error, in energy units.
        max_relative_error: the largest ``|fit - measured| / measured``.
        samples: how many (configuration, energy) samples were fitted.
    """

    r2: float
    rmse: float
    max_relative_error: float
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BilinearEnergy:
    """ECC's energy model (Yang et al., CVPR 2019): bilinear in kept channel fractions.

        E(s) = b0 + sum_{j=1}^{L} a_j s_{j-1} s_j,

    with ``s_j`` the kept fraction of layer j's output channels and ``s_0``
    the kept fraction of the network's input (1). It models structured
    (channel) pruning, where a layer's cost scales with both its input and
    output widths. Fit it to measurements with :meth:`fit`.

    Attributes:
        layers: the kernel names of layers 1..L, in order.
        b0: the constant term (also the floor: every channel pruned).
        a: the coefficients a_1..a_L.
        input_kept: s_0.
    """

    layers: tuple[str, ...]
    b0: float
    a: tuple[float, ...]
    input_kept: float = 1.0

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.a):
            raise ValueError(f"{len(self.layers)} layers but {len(self.a)} coefficients.")

    def terms(self, kept: Sequence[float]) -> np.ndarray:
        """``a_j s_{j-1} s_j`` for every layer, given the kept fractions s_1..s_L."""
        s = np.concatenate([[self.input_kept], np.asarray(kept, np.float64)])
        return np.asarray(self.a) * s[:-1] * s[1:]

    def energy_of(self, kept: Sequence[float]) -> float:
        """``E(s)`` for kept channel fractions s_1..s_L."""
        return self.b0 + float(self.terms(kept).sum())

    def per_layer(self, params: PyTree) -> dict[str, float]:
        terms = self.terms(kept_channels(params, self.layers))
        return dict(zip(self.layers, map(float, terms), strict=True))

    def energy(self, params: PyTree) -> float:
        return self.energy_of(kept_channels(params, self.layers))

    def dense(self) -> float:
        return self.energy_of(np.ones(len(self.layers)))

    def floor(self) -> float:
        return self.b0

    def describe(self) -> dict[str, Any]:
        return {"type": "bilinear", "layers": list(self.layers), "b0": self.b0, "a": list(self.a)}

    @classmethod
    def fit(
        cls,
        layers: Sequence[str],
        kept: np.ndarray,
        energy: np.ndarray,
        *,
        input_kept: float = 1.0,
    ) -> tuple[BilinearEnergy, BilinearFit]:
        """Least-squares fit of b0 and a_j >= 0 to measured (configuration, energy) pairs.

        The model is linear in its coefficients, so this is a bounded linear
        least-squares problem (``scipy.optimize.lsq_linear``; nonnegative
        coefficients, since no layer gives energy back).

        Args:
            layers: kernel names of layers 1..L.
            kept: ``(m, L)`` kept channel fractions of the m measured configurations.
            energy: ``(m,)`` measured energies.

        Returns:
            The fitted model and its :class:`BilinearFit`.
        """
        kept = np.asarray(kept, np.float64)
        energy = np.asarray(energy, np.float64)
        n_layers = len(layers)
        if kept.ndim != 2 or kept.shape[1] != n_layers or energy.shape != (kept.shape[0],):
            raise ValueError(
                f"kept must be (m, {n_layers}) and energy (m,), got {kept.shape} and "
                f"{energy.shape}."
            )
        if kept.shape[0] < n_layers + 1:
            raise ValueError(
                f"{kept.shape[0]} samples cannot determine {n_layers + 1} coefficients; "
                f"measure at least {n_layers + 1} configurations."
            )
        s = np.concatenate([np.full((kept.shape[0], 1), input_kept), kept], axis=1)
        coef, fit = fit_terms(s[:, :-1] * s[:, 1:], energy)
        return cls(tuple(layers), float(coef[0]), tuple(map(float, coef[1:])), input_kept), fit


def fit_terms(terms: np.ndarray, energy: np.ndarray) -> tuple[np.ndarray, BilinearFit]:
    """``[b0, a_1..a_L] >= 0`` minimizing ``||b0 + terms @ a - energy||^2``.

    ``terms`` is ``(m, L)``: each measured configuration's bilinear term
    ``s_in(j) s_out(j)`` per layer. A bounded linear least-squares problem
    (``scipy.optimize.lsq_linear``; nonnegative, since no layer gives energy back).
    """
    from scipy.optimize import lsq_linear

    terms = np.asarray(terms, np.float64)
    energy = np.asarray(energy, np.float64)
    design = np.concatenate([np.ones((terms.shape[0], 1)), terms], axis=1)
    sol = lsq_linear(design, energy, bounds=(0.0, np.inf))
    resid = design @ sol.x - energy
    ss_tot = float(np.sum((energy - energy.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    rel = np.abs(resid) / np.maximum(np.abs(energy), 1e-300)
    fit = BilinearFit(r2, float(np.sqrt(np.mean(resid**2))), float(rel.max()), len(energy))
    return sol.x, fit


__all__ = ["BilinearEnergy", "BilinearFit", "fit_terms", "kept_channels"]
