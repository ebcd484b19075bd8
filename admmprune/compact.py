"""Compact export: a structured-pruned network rebuilt with the removed groups physically gone.

:func:`compact` slices every leaf to its kept channels (a dense kernel's
kept rows and columns, a conv's kept input and output channels, a
BatchNorm's kept scale, shift and statistics, the rows of a dense layer that
read a kept channel after a flatten) and returns a new nnx model whose
layers are that narrow, with removed residual branches replaced by
:class:`admmprune.models.Zero` (``x + 0``, which XLA folds away). Its outputs
equal the masked network's to float tolerance; the MACs it computes are
those the budget counted.

:func:`save_compact` writes ``compact.npz`` (the same ``a/b/c`` key
convention as ``params.npz``, narrower shapes), ``compact.json`` (every leaf's
shape and the kept channels per group) and ``compact.jaxexport`` (the
inference function serialized with ``jax.export``, batch axis symbolic), so
:func:`load_compact` runs it without the original model class.
:func:`latency` times a network at a batch size, median of repeats.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, leaf_names, named_leaves
from admmprune.groups import Structure, StructureError


def kept_indices(
    structure: Structure, params: PyTree, masks: PyTree
) -> dict[str, list[np.ndarray | None]]:
    """Per leaf and axis, the kept positions (None: the whole axis)."""
    channels, branches = structure.kept(masks)
    gone = {leaf for b in structure.branches if not branches[b.name] for leaf in b.leaves}
    shapes = {n: np.shape(x) for n, x in named_leaves(params).items()}
    out: dict[str, list[np.ndarray | None]] = {n: [None] * len(s) for n, s in shapes.items()}
    for g in structure.groups:
        keep = channels[g.name]
        if all(m.leaf in gone for m in g.producers):
            continue  # inside a removed branch: its leaves go with it
        if not keep.any():
            raise StructureError(
                f"group {g.name!r} has no channel left: the network would be cut there; "
                "keep at least one (min_channels)."
            )
        for m in g.members:
            n = shapes[m.leaf][m.axis]
            alive = keep[m.positions(n)]
            prev = out[m.leaf][m.axis]
            out[m.leaf][m.axis] = alive if prev is None else (prev & alive)
    return {n: [None if a is None else np.flatnonzero(a) for a in axes] for n, axes in out.items()}


def compact(model: Any, params: PyTree, masks: PyTree, structure: Structure) -> tuple[Any, PyTree]:
    """The network ``masks`` leaves, with its removed channels and branches physically gone.

    Args:
        model: the nnx model the params belong to (not changed).
        params: its parameters (pruned or not: only ``masks`` decides what stays).
        masks: a structured mask (from a structured budget's projection or a
            solver's result: ``jax.tree.map(lambda x: x != 0, params)``).
        structure: the model's groups (:func:`admmprune.groups.derive`).

    Returns:
        ``(compact_model, compact_params)``: a new nnx model with narrower
        ``Linear``/``Conv``/``BatchNorm`` layers and :class:`~admmprune.models.Zero`
        for removed residual branches, and its parameters (a nested dict as
        from :func:`admmprune.nnx.split_nnx`).
    """
    from flax import nnx

    structure.check(params)
    index = kept_indices(structure, params, masks)
    _, branches = structure.kept(masks)
    flat = named_leaves(params)
    small = {}
    for name, x in flat.items():
        a = np.asarray(x)
        for axis, keep in enumerate(index[name]):
            if keep is not None:
                a = np.take(a, keep, axis=axis)
        small[name] = a
    new = nnx.clone(model)
    removed = [b for b in structure.branches if not branches[b.name]]
    modules = dict(nnx.iter_modules(new))
    for b in removed:
        from admmprune.models import Zero

        *parent, attr = b.name.split("/")
        owner = modules[tuple(_key(p) for p in parent)] if parent else new
        setattr(owner, attr, Zero())
    gone = {leaf for b in removed for leaf in b.leaves}
    for path, module in nnx.iter_modules(new):
        prefix = "/".join(map(str, path))
        prefix = prefix + "/" if prefix else ""
        _resize(module, prefix, small)
    graphdef, state, rest = nnx.split(new, (nnx.Param, nnx.BatchStat), ...)
    pure = nnx.to_pure_dict(state)
    names = leaf_names(pure)
    values = [small[n] for n in names]
    missing = sorted(set(small) - set(names) - gone)
    if missing:
        raise StructureError(f"the compact model lost leaves {missing}.")
    pure = jax.tree.unflatten(jax.tree.structure(pure), [jnp.asarray(v) for v in values])
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state, rest), pure


def _key(p: str) -> Any:
    return int(p) if p.isdigit() else p


def _resize(module: Any, prefix: str, small: dict[str, np.ndarray]) -> None:
    """Updates a layer's width attributes to its sliced parameter shapes."""
    from flax import nnx

    if isinstance(module, nnx.Linear) and prefix + "kernel" in small:
        k = small[prefix + "kernel"]
        module.in_features, module.out_features = int(k.shape[0]), int(k.shape[1])
        _set(module, "kernel", k, prefix, small)
        _set(module, "bias", None, prefix, small)
    elif isinstance(module, nnx.Conv) and prefix + "kernel" in small:
        k = small[prefix + "kernel"]
        module.in_features = int(k.shape[-2]) * int(module.feature_group_count)
        module.out_features = int(k.shape[-1])
        if hasattr(module, "kernel_shape"):
            module.kernel_shape = tuple(int(d) for d in k.shape)
        _set(module, "kernel", k, prefix, small)
        _set(module, "bias", None, prefix, small)
    elif isinstance(module, nnx.BatchNorm) and prefix + "scale" in small:
        module.num_features = int(small[prefix + "scale"].shape[0])
        for leaf in ("scale", "bias", "mean", "var"):
            _set(module, leaf, None, prefix, small)


def _set(module: Any, attr: str, value: Any, prefix: str, small: dict[str, np.ndarray]) -> None:
    var = getattr(module, attr, None)
    if var is None:
        return
    arr = small[prefix + attr] if value is None else value
    var.set_value(jnp.asarray(arr))


def fresh_init(model: Any, seed: int) -> tuple[Any, PyTree]:
    """A copy of ``model`` re-initialized from ``seed`` with flax's default initializers.

    Kernels of ``Linear``/``Conv`` layers draw from LeCun normal (fan-in of
    the layer as it now is, so a narrowed network gets a proper init), biases
    are zero, BatchNorm starts at scale 1, shift 0, mean 0, variance 1. This
    is the "train from scratch" start of Liu et al., ICLR 2019.
    """
    from flax import nnx

    from admmprune.nnx import split_nnx

    new = nnx.clone(model)
    init = nnx.initializers.lecun_normal()
    key = jax.random.key(seed)
    for _, module in nnx.iter_modules(new):
        if isinstance(module, nnx.Linear | nnx.Conv):
            key, sub = jax.random.split(key)
            k = module.kernel
            k.set_value(init(sub, k.shape, k.dtype))
            if module.bias is not None:
                module.bias.set_value(jnp.zeros(module.bias.shape, module.bias.dtype))
        elif isinstance(module, nnx.BatchNorm):
            for leaf, fill in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0)):
                v = getattr(module, leaf, None)
                if v is not None:
                    v.set_value(jnp.full(v.shape, fill, v.dtype))
    params, _ = split_nnx(new)
    return new, params


def uniform_masks(
    structure: Structure, params: PyTree, macs: float, *, min_channels: int = 1
) -> tuple[PyTree, float]:
    """Every group narrowed by the same fraction, the widest that fits ``macs`` MACs.

    The "predefined" architecture of Liu et al. (ICLR 2019): the dense
    network uniformly thinner. Keeps the first ``ceil(f * size)`` channels of
    every group (which ones does not matter for training from scratch) for the
    largest ``f`` (bisection) whose MACs are at most ``macs``.

    Returns:
        ``(masks, f)``.
    """

    def counts(f: float) -> dict[str, int]:
        return {
            g.name: max(min(min_channels, g.size), int(np.ceil(f * g.size)))
            for g in structure.groups
        }

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if structure.macs(counts(mid)) <= macs else (lo, mid)
    keep = {
        n: np.arange(g.size) < counts(lo)[n] for n, g in ((g.name, g) for g in structure.groups)
    }
    return structure.masks(params, keep), lo


# -- saving, loading, timing ---------------------------------------------------


def save_compact(
    out_dir: str | Path,
    model: Any,
    params: PyTree,
    input_shape: tuple[int, ...],
    *,
    info: dict[str, Any] | None = None,
) -> list[str]:
    """Writes ``compact.npz``, ``compact.json`` and ``compact.jaxexport`` into ``out_dir``.

    The exported function is ``model`` in inference mode (BatchNorm on its
    running statistics), as ``f(params, x)`` with ``x`` of shape
    ``(batch, *input_shape)``, the batch symbolic.
    """
    from jax import export

    from admmprune.checkpoint import save_params
    from admmprune.nnx import split_nnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / "compact.npz", params)
    _, apply = split_nnx(model, train=False)
    (b,) = export.symbolic_shape("b")
    x = jax.ShapeDtypeStruct((b, *input_shape), jnp.float32)
    p = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype), params)
    exported = export.export(jax.jit(apply))(p, x)
    (out / "compact.jaxexport").write_bytes(exported.serialize())
    meta = {
        "input_shape": list(input_shape),
        "leaves": {n: list(np.shape(a)) for n, a in named_leaves(params).items()},
        **(info or {}),
    }
    (out / "compact.json").write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n")
    return [str(out / f) for f in ("compact.npz", "compact.json", "compact.jaxexport")]


def load_compact(out_dir: str | Path) -> tuple[Callable[[jax.Array], jax.Array], PyTree]:
    """Loads a saved compact network: ``(f, params)`` with ``f(x)`` its outputs.

    Needs neither the model class nor admmprune's models: the function is
    the serialized ``jax.export`` artifact, the parameters ``compact.npz``.
    """
    from jax import export

    out = Path(out_dir)
    meta = json.loads((out / "compact.json").read_text())
    with np.load(out / "compact.npz") as z:
        flat = {k: jnp.asarray(z[k]) for k in z.files}
    params: dict[str, Any] = {}
    for name in meta["leaves"]:
        node = params
        *head, last = name.split("/")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = flat[name]
    exported = export.deserialize(bytearray((out / "compact.jaxexport").read_bytes()))

    def f(x: jax.Array) -> jax.Array:
        return exported.call(params, x)

    return f, params


def latency(
    apply: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    x: jax.Array,
    *,
    repeats: int = 20,
) -> float:
    """Median seconds of one jitted ``apply(params, x)`` (compile excluded)."""
    fn = jax.jit(apply)
    jax.block_until_ready(fn(params, x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times.append(time.perf_counter() - t)
    return float(statistics.median(times))


def compare_latency(
    dense: tuple[Callable, PyTree],
    small: tuple[Callable, PyTree],
    input_shape: tuple[int, ...],
    *,
    batches: tuple[int, ...] = (256, 1),
    repeats: int = 20,
    rounds: int = 3,
    impls: tuple[str, ...] = ("im2col",),
) -> dict[str, Any]:
    """Dense and compact inference times side by side, at each batch size.

    The two are timed in alternation (``rounds`` times each, ``repeats``
    calls per round) so machine noise hits both; each figure is the median.
    ``impls`` lists the convolution forms to time (:func:`admmprune.models.conv_impl`):
    the first gives ``batch_<n>``; with more, ``by_impl`` holds each form's
    figures and ``best`` the fastest dense form against the fastest compact
    one (what a user who picks the faster form for each network gets).
    """
    from admmprune.models import conv_impl

    def timed(impl: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        key = jax.random.key(0)
        with conv_impl(impl):  # fresh wrappers: a new trace under this form
            fd = functools.partial(_call, dense[0])
            fs = functools.partial(_call, small[0])
            for bs in batches:
                x = jax.random.normal(key, (bs, *input_shape), jnp.float32)
                d, c = [], []
                for _ in range(rounds):
                    d.append(latency(fd, dense[1], x, repeats=repeats))
                    c.append(latency(fs, small[1], x, repeats=repeats))
                dm, cm = statistics.median(d), statistics.median(c)
                out[f"batch_{bs}"] = {
                    "dense_seconds": dm,
                    "compact_seconds": cm,
                    "speedup": dm / cm,
                }
        return out

    runs = {impl: timed(impl) for impl in impls}
    out = dict(runs[impls[0]])
    if len(impls) > 1:
        out["by_impl"] = runs
        best: dict[str, Any] = {}
        for bs in batches:
            k = f"batch_{bs}"
            d = min(impls, key=lambda i: runs[i][k]["dense_seconds"])
            c = min(impls, key=lambda i: runs[i][k]["compact_seconds"])
            dm, cm = runs[d][k]["dense_seconds"], runs[c][k]["compact_seconds"]
            best[k] = {
                "dense_seconds": dm,
                "dense_impl": d,
                "compact_seconds": cm,
                "compact_impl": c,
                "speedup": dm / cm,
            }
        out["best"] = best
    return out


def _call(apply: Callable, params: PyTree, x: jax.Array) -> jax.Array:
    return apply(params, x)


__all__ = [
    "compact",
    "compare_latency",
    "fresh_init",
    "kept_indices",
    "latency",
    "load_compact",
    "save_compact",
    "uniform_masks",
]
