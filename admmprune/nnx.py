"""The flax nnx adapter: an nnx module as (params pytree, pure apply function).

The solvers work on any parameter pytree plus ``loss_fn(params, batch)``.
:func:`split_nnx` turns an nnx module into a plain nested dict of arrays and a
pure, jit-traceable ``apply(params, x)``; :func:`merge_nnx` writes pruned
parameters back into the module. Users of raw JAX or flax linen pass their
parameter pytree directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

from admmprune._tree import PyTree

Apply = Callable[[PyTree, jax.Array], jax.Array]


def split_nnx(model: nnx.Module, *, train: bool | None = None) -> tuple[dict[str, Any], Apply]:
    """Splits an nnx module into plain parameters and a pure apply function.

    The parameters are the module's ``nnx.Param`` variables and its
    ``nnx.BatchStat`` ones (BatchNorm's running ``mean`` and ``var``): the
    statistics travel with the weights, so a pruned network is saved, loaded
    and exported whole. They get no gradient (a train-mode BatchNorm
    normalizes with the batch's statistics and the eval-mode one is not
    trained), and no budget prunes them (one-dimensional leaves); they are
    measured on data by :func:`admmprune.models.calibrate`.

    Args:
        model: the module.
        train: ``True`` for the training-mode function (BatchNorm on batch
            statistics, dropout on), ``False`` for the inference one
            (``model.eval()``: running statistics); ``None`` (default) keeps
            the module's current mode. The module itself is not changed.

    Returns:
        ``(params, apply)``: ``params`` a nested dict of arrays
        (``{"fc1": {"kernel": ..., "bias": ...}, ...}``), and ``apply(params, x)``
        that runs the module with those parameters, pure and jit-traceable.
    """
    if train is not None:
        model = nnx.clone(model)
        model.train() if train else model.eval()
    graphdef, param_state, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
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
    graphdef, param_state, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
    nnx.replace_by_pure_dict(param_state, params)
    return nnx.merge(graphdef, param_state, rest)


LayerHook = Callable[[str, nnx.Module, jax.Array, jax.Array], None]


@contextlib.contextmanager
def record_layers(model: nnx.Module, hook: LayerHook) -> Iterator[None]:
    """Calls ``hook(kernel_name, layer, x, y)`` on every ``nnx.Linear``/``nnx.Conv`` call.

    Inside the ``with`` block, each dense or convolution layer of ``model``
    (subclasses included) reports its input ``x`` and output ``y`` as it
    runs, with the name of its kernel leaf (``"fc1/kernel"``), in call
    order. The classes' ``__call__`` is wrapped for the duration and
    restored on exit; calls of layers outside ``model`` are passed through
    unrecorded.
    """
    paths = {id(m): "/".join(map(str, p)) for p, m in nnx.iter_modules(model)}
    classes = {type(m) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear | nnx.Conv)}
    originals = {cls: cls.__dict__.get("__call__") for cls in classes}

    def wrap(cls: type) -> Callable[..., Any]:
        inner = cls.__call__

        def call(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            y = inner(self, x, *args, **kwargs)
            if id(self) in paths:
                hook(f"{paths[id(self)]}/kernel", self, x, y)
            return y

        return call

    wrapped = {cls: wrap(cls) for cls in classes}
    try:
        for cls, fn in wrapped.items():
            cls.__call__ = fn
        yield
    finally:
        for cls, fn in originals.items():
            if fn is None:
                del cls.__call__
            else:
                cls.__call__ = fn
