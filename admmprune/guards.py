"""Guards at the API boundary and in every training phase.

Inputs are checked before any work, naming the leaf or array and the fix
(:class:`InputError`, a ``ValueError``): parameters must be floating-point
arrays and finite, training data finite, masks shaped and structured like
the params, a budget a :class:`~admmprune.budgets.Budget`.

A run that goes wrong stops with :class:`DivergenceError` (a
``FloatingPointError``, so a :class:`RunFailedError`) instead of ending as a
success: a non-finite loss in any epoch, or a phase whose epoch loss rises
above ``factor`` times its reference -- the loss at the phase's start on its
first few minibatches, at least ``LOSS_FLOOR`` (for ADMM the larger of the
dense network's and its projection's, the two ends W is pulled between). Diverging training grows by
orders of magnitude; a healthy phase stays near or below where it started,
so the default ``factor = 100`` (:data:`DIVERGENCE_FACTOR`) does not fire on
ordinary runs. A non-finite result is a failure too (:func:`check_result`).
One-shot pruning is not judged by its accuracy: a high sparsity may honestly
cost much.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, path_name

DIVERGENCE_FACTOR = 100.0
# The smallest reference the factor multiplies: a well-trained network's loss near zero
# (0.003 for LeNet-5) must not make any later rise to 0.3 a "divergence".
LOSS_FLOOR = 1e-2


class InputError(ValueError):
    """An argument the API cannot use; the message names the leaf or array and the fix."""


class RunFailedError(RuntimeError):
    """A run that went wrong (diverged, non-finite); it is never written as a result."""


class DivergenceError(RunFailedError, FloatingPointError):
    """Training diverged: a non-finite loss, or a loss far above the phase's start."""


def _named(tree: PyTree) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(path_name(p) or "<root>", leaf) for p, leaf in flat]


def _nonfinite(leaf: Any) -> int:
    if isinstance(leaf, jax.core.Tracer):  # under jit: values are not known here
        return 0
    a = jnp.asarray(leaf)
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        return 0
    return int(jnp.size(a) - jnp.count_nonzero(jnp.isfinite(a)))


def check_params(params: PyTree, what: str = "params") -> None:
    """Every leaf is a floating-point array with only finite values.

    Raises:
        InputError: naming the first leaf that is not (its dtype, or how many
            NaN/inf entries it holds).
    """
    named = _named(params)
    if not named:
        raise InputError(f"{what} has no leaves: pass the model's parameter pytree.")
    for name, leaf in named:
        if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
            raise InputError(
                f"{what} leaf {name!r} is a {type(leaf).__name__}, not an array; pass arrays "
                "(jnp.asarray) as leaves."
            )
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise InputError(
                f"{what} leaf {name!r} has dtype {leaf.dtype}: pruning trains floating-point "
                f"weights; cast it, e.g. jnp.asarray(leaf, jnp.float32), or keep it outside "
                "the params."
            )
        bad = _nonfinite(leaf)
        if bad:
            raise InputError(
                f"{what} leaf {name!r} holds {bad} non-finite value(s) (NaN or inf) of "
                f"{int(np.size(leaf))}; fix the weights (e.g. retrain or reload them) before "
                "pruning."
            )


def check_data(data: PyTree, what: str = "data") -> None:
    """Every array of the training data is numeric and, if floating, finite.

    Raises:
        InputError: naming the array (``data[0]`` is the inputs of ``(x, y)``).
    """
    for name, leaf in _named(data):
        label = f"{what}[{name}]" if name != "<root>" else what
        a = jnp.asarray(leaf) if not hasattr(leaf, "dtype") else leaf
        if not (jnp.issubdtype(a.dtype, jnp.number) or jnp.issubdtype(a.dtype, jnp.bool_)):
            raise InputError(f"{label} has dtype {a.dtype}; training data must be numeric arrays.")
        bad = _nonfinite(a)
        if bad:
            raise InputError(
                f"{label} holds {bad} non-finite value(s) (NaN or inf); clean or drop those "
                "examples before training."
            )


def check_masks(masks: PyTree, params: PyTree) -> None:
    """``masks`` has the params' structure, every leaf their shape, and boolean values.

    Raises:
        InputError: naming the first leaf that differs.
    """
    pdef, mdef = jax.tree.structure(params), jax.tree.structure(masks)
    if pdef != mdef:
        pn = [n for n, _ in _named(params)]
        mn = [n for n, _ in _named(masks)]
        missing = sorted(set(pn) - set(mn))[:4]
        extra = sorted(set(mn) - set(pn))[:4]
        raise InputError(
            f"masks do not match the params' structure (missing {missing}, extra {extra}); "
            "build them from the params, e.g. jax.tree.map(lambda w: w != 0, params)."
        )
    for (name, m), (_, p) in zip(_named(masks), _named(params), strict=True):
        if np.shape(m) != np.shape(p):
            raise InputError(f"mask {name!r} has shape {np.shape(m)}, the params {np.shape(p)}.")
        dtype = getattr(m, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.bool_):
            raise InputError(
                f"mask {name!r} has dtype {dtype}; masks are boolean (True = kept), e.g. w != 0."
            )


def check_budget(budget: Any, owner: str) -> None:
    """``budget`` is a :class:`~admmprune.budgets.Budget` (has its seven methods).

    Raises:
        InputError: e.g. ``ADMM(budget=0.1)``, saying to pass ``ParamBudget(keep=0.1)``.
    """
    from admmprune.budgets import Budget

    if isinstance(budget, Budget):
        return
    hint = ""
    if isinstance(budget, int | float) and not isinstance(budget, bool):
        hint = f"; for a kept fraction write ParamBudget(keep={budget})"
    raise InputError(
        f"{owner}(budget={budget!r}): budget must be a Budget, such as ParamBudget(keep=0.02), "
        f"EnergyBudget(model, fraction=0.1) or ChannelBudget(structure, keep=0.5){hint}."
    )


def check_model_params(model: Any, params: PyTree, owner: str) -> None:
    """The params are the nnx ``model``'s: the same leaf names and shapes.

    Raises:
        InputError: naming the leaves missing, extra or misshapen, and the fix.
    """
    from admmprune.nnx import split_nnx

    want = dict(_named(split_nnx(model)[0]))
    got = dict(_named(params))
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise InputError(
            f"{owner}: the params are not the model's: missing {missing[:4]}, extra "
            f"{extra[:4]}; pass the params of this model (admmprune.nnx.split_nnx(model)[0], "
            "trained)."
        )
    for name, leaf in want.items():
        if np.shape(got[name]) != np.shape(leaf):
            raise InputError(
                f"{owner}: params leaf {name!r} has shape {np.shape(got[name])}, the model's "
                f"{np.shape(leaf)}; pass the params of this model."
            )


def check_inputs(params: PyTree, data: PyTree, budget: Any = None, owner: str = "") -> None:
    """What every solver's ``run`` checks first: the params, the data and the budget."""
    check_params(params)
    check_data(data)
    if budget is not None:
        check_budget(budget, owner or "solver")
        budget.check(params)


def check_result(params: PyTree, method: str) -> None:
    """A solver's result must be finite.

    Raises:
        DivergenceError: naming the first non-finite leaf.
    """
    for name, leaf in _named(params):
        bad = _nonfinite(leaf)
        if bad:
            raise DivergenceError(
                f"{method}: the result's leaf {name!r} holds {bad} non-finite value(s); the run "
                "failed and nothing was written as a result."
            )


def start_loss(
    loss_fn: Callable[[PyTree, Any], Any], params: PyTree, data: PyTree, n: int, batches: int = 4
) -> float:
    """The mean loss of ``params`` over the first ``batches`` minibatches of ``n``
    examples (fewer if the data is smaller): a phase's divergence reference."""
    examples = int(jax.tree.leaves(data)[0].shape[0])
    starts = range(0, max(min(examples, n * batches) - n + 1, 1), n)
    losses = [
        float(loss_fn(params, jax.tree.map(lambda a, i=i: a[i : i + n], data))) for i in starts
    ]
    return sum(losses) / len(losses)


def reference_loss(
    loss_fn: Callable[[PyTree, Any], Any], starts: tuple[PyTree, ...], data: PyTree, n: int
) -> float:
    """The largest :func:`start_loss` of ``starts``: for a solver that pulls the weights
    from the dense network towards its projection (ADMM, projected SGD), both ends."""
    return max(start_loss(loss_fn, p, data, n) for p in starts)


class LossWatch:
    """Stops a training phase whose loss diverges (see the module docstring).

    Args:
        phase: named in the error (``"dense"``, ``"admm"``, ``"retrain"``).
        reference: the phase's starting loss.
        factor: the allowed rise over ``max(reference, tiny)``; ``None`` or
            ``0`` turns the watch off (non-finite losses still stop the run).
    """

    def __init__(self, phase: str, reference: float, factor: float | None) -> None:
        self.phase = phase
        self.reference = reference
        self.factor = factor or None

    def __call__(self, loss: float, step: str) -> float:
        """``loss``, unless it (of ``step``) is non-finite or too high: then raises
        :class:`DivergenceError`."""
        if not math.isfinite(loss):
            raise DivergenceError(
                f"{self.phase} diverged: the training loss became {loss} at {step}; lower the "
                "learning rate (for ADMM, also the initial rho)."
            )
        if self.factor is None or not math.isfinite(self.reference):
            return loss
        limit = self.factor * max(abs(self.reference), LOSS_FLOOR)
        if loss > limit:
            raise DivergenceError(
                f"{self.phase} diverged: the training loss {loss:.4g} at {step} is above "
                f"{self.factor:g}x the phase's starting loss {self.reference:.4g}; lower the "
                "learning rate (for ADMM, also the initial rho), or raise divergence_factor."
            )
        return loss


def check_factor(factor: float | None, owner: str) -> None:
    """``divergence_factor`` is None, 0 (off) or a number above 1."""
    if factor is None or factor == 0:
        return
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 1:
        raise InputError(
            f"{owner}: divergence_factor must be above 1 (or 0/None to turn it off), "
            f"got {factor!r}."
        )


__all__ = [
    "DIVERGENCE_FACTOR",
    "DivergenceError",
    "InputError",
    "LossWatch",
    "RunFailedError",
    "check_budget",
    "check_data",
    "check_factor",
    "check_inputs",
    "check_masks",
    "check_model_params",
    "check_params",
    "check_result",
    "reference_loss",
    "start_loss",
]
