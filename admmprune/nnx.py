"""The flax nnx adapter: an nnx module as (params pytree, pure apply function).

The solvers work on any parameter pytree plus ``loss_fn(params, batch)``.
:func:`split_nnx` turns an nnx module into a plain nested dict of arrays and a
pure, jit-traceable ``apply(params, x)``; :func:`merge_nnx` writes pruned
parameters back into the module. Users of raw JAX or flax linen pass their
parameter pytree directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from admmprune._tree import PyTree

Apply = Callable[[PyTree, jax.Array], jax.Array]


def split_nnx(model: nnx.Module) -> tuple[dict[str, Any], Apply]:
    """Splits an nnx module into plain parameters and a pure apply function.

    Returns:
        ``(params, apply)``: ``params`` a nested dict of arrays
        (``{"fc1": {"kernel": ..., "bias": ...}, ...}``) holding the module's
        ``nnx.Param`` variables, and ``apply(params, x)`` that runs the module
        with those parameters, pure and jit-traceable. ``apply`` is cached per
        module so the solvers' jit caches hit across calls.
    """
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)
    return params, _make_apply(graphdef, param_state, rest)


def _make_apply(graphdef: Any, template: Any, rest: Any) -> Apply:
    def apply(params: PyTree, x: jax.Array) -> jax.Array:
        state = jax.tree.map(lambda v: v, template)  # a fresh copy to fill in
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state, rest)(x)

    return apply


def merge_nnx(model: nnx.Module, params: PyTree) -> nnx.Module:
    """Writes ``params`` (a pure dict from :func:`split_nnx`) back into ``model``."""
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(param_state, params)
    return nnx.merge(graphdef, param_state, rest)
