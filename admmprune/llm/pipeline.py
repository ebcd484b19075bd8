"""Sequential layer-wise pruning of a Llama decoder, one block at a time (as SparseGPT).

Calibration windows are embedded once; then for each decoder block, in
order, and within it for each group of linear layers that share an input,
in the order data flows (``q, k, v``; ``o``; ``gate, up``; ``down``):

1. the group's input ``X`` is computed under the block's weights as pruned
   so far, and ``H = X^T X / N`` accumulated in float64 over the windows;
2. each layer of the group is pruned on ``H`` (magnitude, Wanda, SparseGPT
   or layer-wise ADMM; a fraction of each matrix or N:M along its input);

and the block's outputs under its pruned weights feed the next block. Held
out windows, when given, travel the same way and give every layer's
reconstruction error ``tr(D H_ho D^T) / tr(W H_ho W^T)`` on inputs the
pruner never saw. Peak memory is one block plus the activations of the
calibration (and held-out) windows. After each block a checkpoint (the
pruned tensors so far, the activations entering the next block, the
records) is written, so a stopped run resumes at the next block.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from admmprune import obs
from admmprune.guards import DivergenceError
from admmprune.layerwise import Factored, LayerADMM, admm_prune, factorize
from admmprune.llm.llama import Block, Llama
from admmprune.projections import nm_mask

PRUNERS = ("magnitude", "wanda", "sparsegpt", "admm")
GROUPS = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """What each weight matrix keeps: ``1 - fraction`` of it, or ``N`` of every ``M`` inputs."""

    fraction: float | None = None
    nm: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.nm is None):
            raise ValueError("give a sparsity fraction or an N:M pattern, not both or neither.")
        if self.fraction is not None and not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"sparsity {self.fraction} is outside [0, 1).")
        if self.nm is not None and not 0 < self.nm[0] <= self.nm[1]:
            raise ValueError(f"N:M needs 0 < N <= M, got {self.nm[0]}:{self.nm[1]}.")

    def keep(self, shape: tuple[int, int]) -> int:
        rows, cols = shape
        if self.nm is not None:
            return rows * cols * self.nm[0] // self.nm[1]
        return round(rows * cols * (1.0 - self.fraction))

    def check(self, model: Llama) -> None:
        """N:M needs M to divide every matrix's input width."""
        if self.nm is None:
            return
        for name, (fan_in, _) in model.config.linear_shapes().items():
            if fan_in % self.nm[1]:
                raise ValueError(
                    f"N:M with M={self.nm[1]} does not divide {name}'s input width {fan_in}."
                )

    def describe(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.fraction:.0%} unstructured"


def prune_weights(
    method: str,
    w: jax.Array,
    h: np.ndarray,
    sparsity: Sparsity,
    admm: LayerADMM,
    factored: Factored | None = None,
) -> jax.Array:
    """One matrix ``W`` (``d_out x d_in``) pruned by ``method`` on ``H`` (ADMM may be
    given ``H``'s :func:`~admmprune.layerwise.factorize`, shared by a group)."""
    k = sparsity.keep(w.shape)
    nm = sparsity.nm
    if method in ("magnitude", "wanda"):
        if nm is None:
            mask = obs.wanda_mask(w, h, k) if method == "wanda" else obs.magnitude_mask(w, k)
        else:  # the same scores, N:M along the input
            scores = jnp.abs(w)
            if method == "wanda":
                norms = np.sqrt(np.maximum(np.diagonal(np.asarray(h)), 0.0))
                scores = scores * jnp.asarray(norms, w.dtype)[None, :]
            mask = nm_mask(scores.T, *nm).T
        return jnp.where(mask, w, 0.0)
    if method == "sparsegpt":
        return obs.fast_obs(w, h, None if nm else k, nm=nm, quota="block")[0]
    if method == "admm":
        return admm_prune(w, h, None if nm else k, nm=nm, settings=admm, factored=factored)[0]
    raise ValueError(f"unknown pruner {method!r}; choose one of {', '.join(PRUNERS)}.")


def _taps(block: Block, h: jax.Array) -> dict[str, jax.Array]:
    """The input of each of the block's linear layers, flattened to ``(tokens, d_in)``."""
    a = block.attn_norm(h)
    att = block.attention(a)
    h2 = h + block.attn_output(att)
    m = block.ffn_norm(h2)
    hidden = jax.nn.silu(block.ffn_gate(m)) * block.ffn_up(m)
    flat = {"attn": a, "attn_output": att, "ffn": m, "ffn_down": hidden}
    return {k: v.reshape(-1, v.shape[-1]) for k, v in flat.items()}


_TAP_OF = {
    "attn_q": "attn",
    "attn_k": "attn",
    "attn_v": "attn",
    "attn_output": "attn_output",
    "ffn_gate": "ffn",
    "ffn_up": "ffn",
    "ffn_down": "ffn_down",
}


@functools.partial(jax.jit, static_argnames=("graphdef", "tap"))
def _tap(graphdef: Any, state: Any, h: jax.Array, tap: str) -> jax.Array:
    from flax import nnx

    return _taps(nnx.merge(graphdef, state), h)[tap]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _block_forward(graphdef: Any, state: Any, h: jax.Array) -> jax.Array:
    from flax import nnx

    return nnx.merge(graphdef, state)(h)


def _placed(mesh: Any, windows: np.ndarray, state: Any) -> tuple[jax.Array, Any]:
    """A chunk of windows split over ``mesh`` (when it divides evenly) and the block's
    state replicated; without a mesh, plain device arrays."""
    if mesh is None or len(windows) % mesh.devices.size:
        return jnp.asarray(windows), state
    from admmprune.training import place_on_mesh

    placed, state, _ = place_on_mesh(mesh, windows, state, len(windows))
    return placed, state


def _grams(
    block: Block, acts: np.ndarray, tap: str, batch: int, mesh: Any = None
) -> tuple[np.ndarray, int]:
    """``X^T X`` (float64) of one tap over every window of ``acts``, and the token count.

    With a ``mesh``, each chunk of windows is split across its devices and the
    products summed by XLA's SPMD partitioner.
    """
    from flax import nnx

    graphdef, state = nnx.split(block)
    total, count = None, 0
    with jax.enable_x64(True):
        for i in range(0, len(acts), batch):
            chunk, where = _placed(mesh, acts[i : i + batch], state)
            x = _tap(graphdef, where, chunk, tap)
            g = np.asarray(obs._gram(x))
            total = g if total is None else total + g
            count += int(x.shape[0])
    return total, count


def _forward(block: Block, acts: np.ndarray, batch: int, mesh: Any = None) -> np.ndarray:
    from flax import nnx

    graphdef, state = nnx.split(block)
    out = []
    for i in range(0, len(acts), batch):
        chunk, where = _placed(mesh, acts[i : i + batch], state)
        out.append(np.asarray(_block_forward(graphdef, where, chunk)))
    return np.concatenate(out)


def _embed(model: Llama, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model.token_embd[...])[tokens]


def prune_llama(
    model: Llama,
    calibration: np.ndarray,
    *,
    method: str,
    sparsity: Sparsity,
    held_out: np.ndarray | None = None,
    admm: LayerADMM = LayerADMM(),
    batch: int = 8,
    checkpoint: str | Path | None = None,
    stop_after: int | None = None,
    on_block: Callable[[int, list[dict[str, Any]]], None] | None = None,
    mesh: Any = None,
) -> list[dict[str, Any]]:
    """Prunes ``model`` in place, block by block; returns one record per layer.

    Args:
        model: the decoder (its linear kernels are replaced by pruned ones).
        calibration: ``(n, context)`` int token windows.
        method: one of :data:`PRUNERS`.
        sparsity: the per-matrix :class:`Sparsity`.
        held_out: optional ``(m, context)`` windows scored, never fitted.
        admm: settings of the layer-wise ADMM.
        batch: windows per forward pass.
        checkpoint: a directory: after each block, ``pruned.npz`` holds the
            pruned kernels so far, the activations entering the next block,
            the records and where to resume; an existing one written by the
            same method, sparsity and window count is resumed from.
        stop_after: stop after this many blocks (a checkpoint marks where).
        on_block: called after each block with its index and all records.
        mesh: a ``jax.sharding.Mesh``: the calibration (and held-out) windows
            of every forward pass are split across its devices (``batch`` a
            multiple of its size); the Hessians equal the one-device ones up
            to float summation order.

    Records: ``block``, ``layer``, ``kept``, ``weights``, ``error`` (on the
    calibration windows), ``held_out_error``, ``seconds`` (the pruner alone).
    """
    if method not in PRUNERS:
        raise ValueError(f"unknown pruner {method!r}; choose one of {', '.join(PRUNERS)}.")
    sparsity.check(model)
    tag = {"method": method, "sparsity": sparsity.describe(), "windows": len(calibration)}
    if method == "admm":  # a checkpoint of another version's or settings' ADMM is not resumed
        tag["admm"] = {**dataclasses.asdict(admm), "version": 2}
    records: list[dict[str, Any]] = []
    start = 0
    acts = _embed(model, calibration)
    held = None if held_out is None else _embed(model, held_out)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and (ckpt / "pruned.npz").exists():
        try:
            saved = np.load(ckpt / "pruned.npz")
            meta = json.loads(str(saved["meta"]))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"{ckpt / 'pruned.npz'} is not a readable checkpoint ({e}); "
                "delete it to start afresh."
            ) from None
        if meta["tag"] != tag:
            raise ValueError(
                f"{ckpt} holds a checkpoint of {meta['tag']}, not {tag}: use another directory."
            )
        start, records = meta["next_block"], meta["records"]
        for i in range(start):
            for name in (n for g in GROUPS for n in g):
                getattr(model.blk[i], name).kernel[...] = jnp.asarray(saved[f"blk.{i}.{name}"])
        acts = saved["acts"]
        if "held" in saved:
            held = saved["held"]
    for i in range(start, len(model.blk)):
        block = model.blk[i]
        for group in GROUPS:
            tap = _TAP_OF[group[0]]
            gram, n = _grams(block, acts, tap, batch, mesh)
            h = gram / n
            h_ho = None
            if held is not None:
                g_ho, n_ho = _grams(block, held, tap, batch, mesh)
                h_ho = g_ho / n_ho
            # ADMM decomposes H once per group (q, k, v; gate, up share their inputs);
            # the time is the group's first layer's.
            tick = time.perf_counter()
            fac = jax.block_until_ready(factorize(h, admm)) if method == "admm" else None
            shared = time.perf_counter() - tick
            for name in group:
                layer = getattr(block, name)
                w = layer.kernel[...].T
                tick = time.perf_counter()
                w_new = jax.block_until_ready(prune_weights(method, w, h, sparsity, admm, fac))
                seconds = time.perf_counter() - tick + shared
                shared = 0.0
                if not bool(jnp.all(jnp.isfinite(w_new))):
                    raise DivergenceError(
                        f"blk.{i}.{name}: the {method} pruner gave non-finite weights."
                    )
                layer.kernel[...] = w_new.T
                records.append(
                    {
                        "block": i,
                        "layer": name,
                        "kept": int(jnp.sum(w_new != 0)),
                        "weights": int(w_new.size),
                        "error": obs.reconstruction_error(w, w_new, h),
                        "held_out_error": None
                        if h_ho is None
                        else obs.reconstruction_error(w, w_new, h_ho),
                        "seconds": seconds,
                    }
                )
        acts = _forward(block, acts, batch, mesh)
        if held is not None:
            held = _forward(block, held, batch, mesh)
        if ckpt is not None:
            _save(ckpt, model, i + 1, acts, held, records, tag)
        if on_block is not None:
            on_block(i, records)
        if stop_after is not None and i + 1 >= stop_after and i + 1 < len(model.blk):
            break
    return records


def _save(
    ckpt: Path,
    model: Llama,
    next_block: int,
    acts: np.ndarray,
    held: np.ndarray | None,
    records: list[dict[str, Any]],
    tag: dict[str, Any],
) -> None:
    """The checkpoint as one file (arrays and records together), written beside and
    renamed into place: a run killed at any point leaves the previous one whole."""
    ckpt.mkdir(parents=True, exist_ok=True)
    meta = {"tag": tag, "next_block": next_block, "records": records}
    arrays = {"acts": acts, "meta": np.asarray(json.dumps(meta))}
    if held is not None:
        arrays["held"] = held
    for i in range(next_block):
        for name in (n for g in GROUPS for n in g):
            arrays[f"blk.{i}.{name}"] = np.asarray(getattr(model.blk[i], name).kernel[...])
    partial = ckpt / "pruned.partial.npz"
    np.savez(partial, **arrays)
    partial.replace(ckpt / "pruned.npz")


__all__ = ["GROUPS", "PRUNERS", "Sparsity", "prune_llama", "prune_weights"]
