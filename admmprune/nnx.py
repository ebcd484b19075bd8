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
import jax.numpy as jnp
from flax import nnx

from admmprune._tree import PyTree, path_name

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


def has_batch_stats(model: nnx.Module) -> bool:
    """Whether ``model`` holds BatchNorm statistics (``nnx.BatchStat`` variables)."""
    return any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(model))


def calibrate_batch_stats(
    model: nnx.Module, params: PyTree, x: jax.Array, *, batch_size: int = 500
) -> PyTree:
    """``params`` with every BatchNorm's ``mean`` and ``var`` measured on inputs ``x``.

    Runs the network in training mode (each BatchNorm normalizing with its
    batch's statistics, as in training) over ``x`` in batches, and sets each
    BatchNorm's running statistics to the average over batches of its input's
    per-channel mean and variance (``E[x^2] - E[x]^2`` pooled). The weights are
    not touched. Pruning changes every statistic after the first pruned
    layer, so statistics are measured, not trained: after dense training,
    after every pruning run and before every evaluation of a pruned network
    ("BatchNorm recalibration"). A model without BatchNorm is returned as is.
    For repeated calls build :func:`batch_stats_calibrator` once (it compiles once).
    """
    return batch_stats_calibrator(model, batch_size=batch_size)(params, x)


def batch_stats_calibrator(
    model: nnx.Module, *, batch_size: int = 500
) -> Callable[[PyTree, jax.Array], PyTree]:
    """``f(params, x)``: :func:`calibrate_batch_stats` for ``model``, compiled once."""
    if not has_batch_stats(model):
        return lambda params, x: params
    train_model = nnx.clone(model)
    train_model.train()
    stats = _batch_moments(train_model)

    def calibrate(params: PyTree, x: jax.Array) -> PyTree:
        n = int(x.shape[0])
        bs = min(batch_size, n)
        sums: dict[str, Any] = {}
        count = 0
        for start in range(0, n - bs + 1, bs):
            moments = stats(params, x[start : start + bs])
            for k, (m1, m2) in moments.items():
                a, b = sums.get(k, (0.0, 0.0))
                sums[k] = (a + m1, b + m2)
            count += 1
        flat = {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        for prefix, (m1, m2) in sums.items():
            mean = m1 / count
            var = jnp.maximum(m2 / count - mean**2, 0.0)
            flat[prefix + "/mean"] = mean.astype(flat[prefix + "/mean"].dtype)
            flat[prefix + "/var"] = var.astype(flat[prefix + "/var"].dtype)
        names = [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        return jax.tree.unflatten(jax.tree.structure(params), [flat[k] for k in names])

    return calibrate


def _batch_moments(model: nnx.Module) -> Callable[[PyTree, jax.Array], dict[str, Any]]:
    """A jitted ``f(params, x) -> {bn_path: (mean, mean of squares)}`` of every BatchNorm input."""
    graphdef, state, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)

    @jax.jit
    def moments(params: PyTree, x: jax.Array) -> dict[str, Any]:
        st = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(st, params)
        m = nnx.merge(graphdef, st, rest)
        paths = {id(mod): "/".join(map(str, p)) for p, mod in nnx.iter_modules(m)}
        out: dict[str, Any] = {}
        inner = nnx.BatchNorm.__call__

        def call(self: Any, h: Any, *args: Any, **kwargs: Any) -> Any:
            if id(self) in paths:
                axes = tuple(range(h.ndim - 1))
                hf = h.astype(jnp.float32)
                out[paths[id(self)]] = (hf.mean(axes), jnp.square(hf).mean(axes))
            return inner(self, h, *args, **kwargs)

        nnx.BatchNorm.__call__ = call
        try:
            m(x)
        finally:
            nnx.BatchNorm.__call__ = inner
        return out

    return moments
