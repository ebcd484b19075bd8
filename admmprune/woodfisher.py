"""Global OBS with the empirical Fisher (WoodFisher, Singh & Alistarh, NeurIPS 2020).

Over all prunable weights ``theta`` (flattened, in blocks of ``B``
consecutive entries), the loss Hessian is approximated by the damped
empirical Fisher, block-diagonal:

    F = lambda I + (1/m) sum_n g_n g_n^T,     g_n = grad of example n's loss,

and its inverse is built without a matrix inverse, from ``F^-1 = I / lambda``
by Woodbury updates with ``c`` gradients at a time
(``G``: ``c x B``, one block):

    F^-1 <- F^-1 - F^-1 G^T (m I_c + G F^-1 G^T)^-1 G F^-1

(a ``c x c`` Cholesky solve; ``c = 1`` is the rank-one update of the paper).
Pruning then follows OBS over the whole network: the saliency of weight
``q`` is ``w_q^2 / (2 [F^-1]_qq)``, the least salient are removed globally,
and in every block the removed set ``Q`` moves the others by the joint OBS
update

    dw = -F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q,

done as one Cholesky solve of ``M F^-1 M + (I - M)`` (``M = diag(1_Q)``).
With ``steps > 1`` the budget is reached gradually (kept fraction
geometric in the step), the Fisher recomputed at the pruned point each
time, as WoodFisher does for high sparsities. Affordable for MLPs of the
size of LeNet-300-100 (266k weights: 2,080 blocks of 128).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

from admmprune._tree import PyTree, apply_masks
from admmprune.projections import topk_mask_flat
from admmprune.training import LossFn, per_example_grads


def _flat_prunable(params: PyTree, flags: list[bool]) -> tuple[jax.Array, list[Any]]:
    leaves = jax.tree.leaves(params)
    return jnp.concatenate([leaves[i].ravel() for i, f in enumerate(flags) if f]), leaves


def _unflat(params: PyTree, flags: list[bool], vec: jax.Array, cast: bool = True) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    out, at = [], 0
    for leaf, f in zip(leaves, flags, strict=True):
        if f:
            part = vec[at : at + leaf.size].reshape(leaf.shape)
            out.append(part.astype(leaf.dtype) if cast else part)
            at += leaf.size
        else:
            out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _per_example_grads(
    loss_fn: LossFn, params: PyTree, flags: list[bool], x: jax.Array, y: jax.Array
) -> jax.Array:
    """``(n, P)``: each example's gradient with respect to the prunable weights."""
    g = jax.tree.leaves(per_example_grads(loss_fn, params, (x, y)))
    return jnp.concatenate(
        [a.reshape(a.shape[0], -1) for a, f in zip(g, flags, strict=True) if f], 1
    )


@functools.partial(jax.jit, static_argnames=("loss_fn", "flags", "block"))
def _woodbury_chunk(
    finv: jax.Array,
    params: PyTree,
    mask_vec: jax.Array,
    x: jax.Array,
    y: jax.Array,
    m: jax.Array,
    loss_fn: LossFn,
    flags: tuple[bool, ...],
    block: int,
) -> jax.Array:
    g = _per_example_grads(loss_fn, params, list(flags), x, y) * mask_vec[None, :]
    c = g.shape[0]
    pad = finv.shape[0] * block - g.shape[1]
    g = jnp.pad(g, ((0, 0), (0, pad))).astype(finv.dtype)
    g = g.reshape(c, -1, block).transpose(1, 0, 2)  # (blocks, c, B)

    def update(fi: jax.Array, gb: jax.Array) -> jax.Array:
        fg = fi @ gb.T  # (B, c)
        small = m * jnp.eye(c, dtype=fi.dtype) + gb @ fg
        return fi - fg @ cho_solve(cho_factor(small), fg.T)

    return jax.vmap(update)(finv, g)


def fisher_inverse_blocks(
    loss_fn: LossFn,
    params: PyTree,
    flags: list[bool],
    data: tuple[jax.Array, jax.Array],
    *,
    mask_vec: jax.Array | None = None,
    block: int = 128,
    damp: float = 1e-3,
    chunk: int = 32,
) -> jax.Array:
    """``(blocks, B, B)``: the inverse of the damped empirical Fisher's diagonal blocks.

    ``lambda = damp * mean(diag of the undamped Fisher)``; gradients are taken
    with ``mask_vec`` applied, so weights already pruned decouple (their
    rows and columns are ``lambda I``). Accumulated in float64.
    """
    x, y = data
    m = int(x.shape[0])
    vec, _ = _flat_prunable(params, flags)
    size = int(vec.size)
    if mask_vec is None:
        mask_vec = jnp.ones((size,), vec.dtype)
    blocks = -(-size // block)
    ftuple = tuple(flags)
    sq = 0.0
    for s in range(0, m, chunk):
        g = _per_example_grads(loss_fn, params, flags, x[s : s + chunk], y[s : s + chunk])
        sq += float(jnp.sum((g * mask_vec[None, :]) ** 2))
    lam = damp * sq / (m * size) if sq > 0 else damp
    with jax.enable_x64(True):
        finv = jnp.broadcast_to(jnp.eye(block, dtype=jnp.float64) / lam, (blocks, block, block))
        for s in range(0, m, chunk):
            finv = _woodbury_chunk(
                finv,
                params,
                mask_vec,
                x[s : s + chunk],
                y[s : s + chunk],
                jnp.float64(m),
                loss_fn,
                ftuple,
                block,
            )
        return finv


@jax.jit
def _joint_obs_update(finv: jax.Array, w: jax.Array, remove: jax.Array) -> jax.Array:
    """Per block: ``w - F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q``, then ``w_Q = 0``."""

    def one(fi: jax.Array, wb: jax.Array, q: jax.Array) -> jax.Array:
        qf = q.astype(fi.dtype)
        a = fi * qf[:, None] * qf[None, :] + jnp.diag(1.0 - qf)
        z = cho_solve(cho_factor(a), wb * qf)
        return jnp.where(q, 0.0, wb - fi @ z)

    return jax.vmap(one)(finv, w, remove)


def global_obs(
    loss_fn: LossFn,
    params: PyTree,
    flags: list[bool],
    k: int,
    data: tuple[jax.Array, jax.Array],
    *,
    block: int = 128,
    damp: float = 1e-3,
    steps: int = 4,
    chunk: int = 32,
) -> tuple[PyTree, PyTree, list[dict[str, Any]]]:
    """Prunes the prunable leaves (``flags``) to ``k`` weights in all by global OBS.

    Args:
        loss_fn: ``loss_fn(params, (x, y))`` -> mean loss of the batch.
        params: trained parameters.
        flags: which leaves (``jax.tree.leaves`` order) are prunable.
        k: weights kept over all prunable leaves.
        data: calibration examples ``(x, y)`` for the empirical Fisher.
        block: Fisher block size (consecutive flattened weights).
        damp: ``lambda`` as a fraction of the Fisher's mean diagonal.
        steps: pruning steps, the kept count geometric from dense to ``k``.
        chunk: gradients per Woodbury update.

    Returns:
        ``(pruned params, masks, per-step records)``.
    """
    vec, _ = _flat_prunable(params, flags)
    size = int(vec.size)
    if not 0 <= k <= size:
        raise ValueError(f"k={k} is outside [0, {size}] prunable weights.")
    blocks = -(-size // block)
    pad = blocks * block - size
    alive = jnp.ones((size,), bool)
    current = params
    records = []
    for step in range(1, steps + 1):
        target = k if step == steps else max(k, round(size * (k / size) ** (step / steps)))
        mask_vec = alive.astype(vec.dtype)
        finv = fisher_inverse_blocks(
            loss_fn, current, flags, data, mask_vec=mask_vec, block=block, damp=damp, chunk=chunk
        )
        with jax.enable_x64(True):
            w, _ = _flat_prunable(current, flags)
            w = w.astype(jnp.float64)
            d = jnp.diagonal(finv, axis1=1, axis2=2).reshape(-1)[:size]
            saliency = jnp.where(alive, w**2 / (2 * d), -1.0)
            keep = topk_mask_flat(saliency, target) & alive
            remove = alive & ~keep
            wp = jnp.pad(w, (0, pad)).reshape(blocks, block)
            rp = jnp.pad(remove, (0, pad)).reshape(blocks, block)
            w_new = _joint_obs_update(finv, wp, rp).reshape(-1)[:size]
            w_new = jnp.where(keep, w_new, 0.0)
            est = float(jnp.sum(jnp.where(remove, saliency, 0.0)))
        alive = keep
        current = _unflat(current, flags, w_new.astype(vec.dtype))
        records.append({"step": step, "kept": int(jnp.sum(keep)), "removed_saliency_sum": est})
    masks = _unflat(
        jax.tree.map(lambda a: jnp.ones(a.shape, bool), params), flags, alive, cast=False
    )
    return apply_masks(current, masks), masks, records


__all__ = ["fisher_inverse_blocks", "global_obs"]
