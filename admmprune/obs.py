"""Layer-wise second-order pruning: OBS with a shared input Hessian.

For a linear layer with weights ``W`` (``d_out x d_in``, one row per output
unit) and calibration inputs ``X`` (``n x d_in``), pruning to a mask ``M``
and moving the kept weights to ``W'`` costs the reconstruction error

    ||X W^T - X W'^T||_F^2 / n = tr((W - W') H (W - W')^T),    H = X^T X / n,

the same Hessian ``H`` for every output unit (OBC, Frantar & Alistarh,
NeurIPS 2022). Removing weight ``q`` of a row ``w`` costs
``w_q^2 / (2 [H^-1]_qq)`` and the optimal move of the others is
``dw = -(w_q / [H^-1]_qq) H^-1 e_q`` (Hassibi & Stork, NeurIPS 1993).

Solvers, all jit-compiled with no Python loop over weights:

* :func:`fast_obs` -- SparseGPT (Frantar & Alistarh, ICML 2023): one sweep
  over the input columns with the upper Cholesky factor ``U`` of ``H^-1``,
  ``O(d_in^3 + d_out d_in^2)``. The mask is chosen over the whole layer by
  ``w^2 / U_ii^2`` (or per block, as published, with ``adaptive=True``), or
  per group of M columns for N:M.
* :func:`exact_obs` -- OBC: greedy exact OBS on every output row down to
  zero weights, the rows' loss curves merged to choose the layer's mask
  jointly, then :func:`refit`. ``O(d_out d_in^3)``: for small layers.
* :func:`refit` -- for a fixed mask, the least-squares optimal kept weights
  of every row (a Cholesky solve on the kept rows and columns of ``H``).
* :func:`magnitude_mask` and :func:`wanda_mask` (Sun et al., ICLR 2024,
  ``|W_ij| ||X_j||``) -- masks without an update, as baselines.

Convolutions are the same problem on their im2col matrix
(:func:`layer_matrix`); :func:`prune_layerwise` runs a network layer by
layer, each layer's calibration inputs passing through the already-pruned
layers before it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_factor, cho_solve, solve_triangular

from admmprune._tree import PyTree, leaf_names
from admmprune.projections import topk_mask_flat

if TYPE_CHECKING:
    from flax import nnx

Method = Literal["magnitude", "wanda", "refit", "fast_obs", "exact_obs"]
METHODS: tuple[str, ...] = ("magnitude", "wanda", "refit", "fast_obs", "exact_obs")


# --------------------------------------------------------------------- inputs
def layer_matrix(layer: nnx.Module, x: jax.Array) -> jax.Array:
    """The ``(rows, d_in)`` matrix a layer multiplies by its kernel.

    A dense layer's input, flattened over leading axes; a convolution's
    im2col patches, in the ``(kh, kw, c_in)`` order of
    ``kernel.reshape(-1, c_out)``, one row per output position.
    """
    from flax import nnx

    if not isinstance(layer, nnx.Conv):
        return x.reshape(-1, x.shape[-1])
    if int(layer.feature_group_count) != 1:
        raise ValueError(
            "grouped convolutions are not supported by layer-wise OBS; leave the layer "
            "out with the budget's prunable_filter."
        )
    kh, kw = (int(k) for k in layer.kernel_size)
    c = x.shape[-1]
    pad = layer.padding
    if isinstance(pad, int):
        pad = [(pad, pad)] * 2
    elif not isinstance(pad, str):
        pad = [(p, p) if isinstance(p, int) else tuple(p) for p in pad]
    strides = layer.strides if layer.strides is not None else 1
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    dil = layer.kernel_dilation if layer.kernel_dilation is not None else 1
    dil = (dil, dil) if isinstance(dil, int) else tuple(dil)
    patches = jax.lax.conv_general_dilated_patches(
        x,
        (kh, kw),
        strides,
        pad,
        rhs_dilation=dil,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # features in (c, kh, kw) order
    patches = patches.reshape(*patches.shape[:-1], c, kh, kw)
    patches = jnp.moveaxis(patches, -3, -1)
    return patches.reshape(-1, kh * kw * c)


def calibration_inputs(model: nnx.Module, params: PyTree, x: jax.Array) -> dict[str, jax.Array]:
    """Every dense/conv layer's input matrix (:func:`layer_matrix`) at ``params``, in call order."""
    from admmprune.nnx import merge_nnx, record_layers

    seen: dict[str, jax.Array] = {}

    def hook(name: str, layer: Any, inp: Any, _: Any) -> None:
        seen.setdefault(name, layer_matrix(layer, inp))

    net = merge_nnx(model, params)
    with record_layers(net, hook):
        net(jnp.asarray(x))
    return seen


@jax.jit
def _gram(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float64)
    return x.T @ x


def hessian(x: jax.Array, chunk: int = 8192) -> np.ndarray:
    """``H = X^T X / n`` in float64 (accumulated over row chunks of ``x``).

    Returned as a NumPy float64 array, so that it keeps its precision
    outside JAX's x64 mode; the solvers enter x64 mode to use it.
    """
    with jax.enable_x64(True):
        h = jnp.zeros((x.shape[1], x.shape[1]), jnp.float64)
        for s in range(0, x.shape[0], chunk):
            h = h + _gram(jnp.asarray(x[s : s + chunk]))
        return np.asarray(h / x.shape[0])


def damped(h: jax.Array, damp: float = 0.01) -> jax.Array:
    """``H + damp * mean(diag H) * I`` (SparseGPT's damping; dead inputs get it too)."""
    mean = jnp.mean(jnp.diagonal(h))
    lam = damp * jnp.where(mean > 0, mean, 1.0)  # an all-dead layer still gets damping
    return h + lam * jnp.eye(h.shape[0], dtype=h.dtype)


def inverse_cholesky_upper(h: jax.Array) -> jax.Array:
    """Upper-triangular ``U`` with ``H^-1 = U^T U``, without forming ``H^-1``.

    With ``J`` the reversal permutation, ``J H J = L L^T`` (Cholesky) gives
    ``H^-1 = (J L^-T J)(J L^-1 J)``, and ``J L^-1 J`` is upper triangular: one
    Cholesky factorization and one triangular solve.
    """
    flipped = h[::-1, ::-1]
    lower = jnp.linalg.cholesky(flipped)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    inv_lower = solve_triangular(lower, eye, lower=True)
    return inv_lower[::-1, ::-1]


# ---------------------------------------------------------------------- masks
def _check_count(w: jax.Array, k: int) -> int:
    n = int(np.prod(w.shape))
    if not 0 <= int(k) <= n:
        raise ValueError(f"keep count {k} is outside [0, {n}] for a {w.shape} layer.")
    return int(k)


def magnitude_mask(w: jax.Array, k: int) -> jax.Array:
    """The layer-wide top-``k`` of ``|W|``."""
    k = _check_count(w, k)
    return topk_mask_flat(jnp.abs(w).ravel(), k).reshape(w.shape)


def _row_counts(k: int, rows: int, cols: int) -> jax.Array:
    base, extra = divmod(k, rows)
    return jnp.minimum(jnp.full((rows,), base) + (jnp.arange(rows) < extra), cols)


def _per_row_topk(scores: jax.Array, counts: jax.Array) -> jax.Array:
    order = jnp.argsort(-scores, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)
    return rank < counts[:, None]


def wanda_mask(w: jax.Array, h: jax.Array, k: int) -> jax.Array:
    """Wanda: per output row, the largest ``|W_ij| ||X_j||`` (``||X_j||^2 = n H_jj``).

    ``k`` weights in all, spread evenly over the rows (Sun et al. compare
    within each output, not across the layer).
    """
    k = _check_count(w, k)
    norms = np.sqrt(np.maximum(np.diagonal(np.asarray(h)), 0.0))
    scores = jnp.abs(w) * jnp.asarray(norms, w.dtype)[None, :]
    return _per_row_topk(scores, _row_counts(k, *w.shape))


# ---------------------------------------------------------------------- refit
@jax.jit
def _refit_rows(hw: jax.Array, h: jax.Array, mask: jax.Array) -> jax.Array:
    def row(b: jax.Array, m: jax.Array) -> jax.Array:
        mf = m.astype(h.dtype)
        a = h * mf[:, None] * mf[None, :] + jnp.diag(1.0 - mf)
        return cho_solve(cho_factor(a), b * mf) * mf

    return jax.vmap(row)(hw, mask)


def refit(
    w: jax.Array, h: jax.Array, mask: jax.Array, *, damp: float = 0.01, batch: int = 8
) -> jax.Array:
    """Least-squares optimal kept weights for a fixed mask.

    Row ``i`` keeps ``K_i``; ``w'_K = argmin ||X w_i - X_K w'_K||^2`` solves
    ``H_KK w'_K = (H w_i)_K``, done as one Cholesky solve of
    ``M H M + (I - M)`` (``M = diag(mask_i)``) per row, in float64.
    """
    with jax.enable_x64(True):
        hd = damped(jnp.asarray(h, jnp.float64), damp)
        hw = jnp.asarray(w, jnp.float64) @ hd  # row i: (H w_i)^T
        mask = jnp.asarray(mask)
        # Chunks of rows (a Python loop over row blocks, not weights): a
        # batched Cholesky per chunk bounds the memory to batch * d_in^2.
        out = jnp.concatenate(
            [
                _refit_rows(hw[s : s + batch], hd, mask[s : s + batch])
                for s in range(0, len(hw), batch)
            ]
        )
    return out.astype(w.dtype)


# ------------------------------------------------------------------- fast OBS
@functools.partial(jax.jit, static_argnames=("cols", "block", "nm"))
def _sweep(
    w: jax.Array,
    u: jax.Array,
    quota: jax.Array,
    cols: int,
    block: int,
    nm: tuple[int, int] | None,
) -> tuple[jax.Array, jax.Array]:
    """The OBS sweep over padded columns; each block's (or N:M group's) mask is
    chosen from its current weights when the sweep reaches it."""
    rows, total = w.shape
    diag = jnp.diagonal(u)

    def block_step(b: jax.Array, carry: tuple[jax.Array, jax.Array]) -> Any:
        w, mask = carry
        i1 = b * block
        w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, block))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block, block))
        d1 = jax.lax.dynamic_slice(diag, (i1,), (block,))
        if nm is None:
            real = (i1 + jnp.arange(block)) < cols
            s = jnp.where(real[None, :], w1**2 / d1[None, :] ** 2, -jnp.inf).ravel()
            order = jnp.argsort(-s, stable=True)
            top = jnp.zeros(s.shape, bool).at[order].set(jnp.arange(s.size) < quota[b])
            m1 = top.reshape(rows, block) & real[None, :]
        else:
            m1 = jnp.zeros((rows, block), bool)

        def column(i: jax.Array, c: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
            w1, m1, e1 = c
            if nm is not None:
                n_keep, m_group = nm

                def choose(m1: jax.Array) -> jax.Array:
                    g = jax.lax.dynamic_slice(w1, (0, i), (rows, m_group))
                    dg = jax.lax.dynamic_slice(d1, (i,), (m_group,))
                    best = _per_row_topk(g**2 / dg[None, :] ** 2, jnp.full((rows,), n_keep))
                    return jax.lax.dynamic_update_slice(m1, best, (0, i))

                m1 = jax.lax.cond(i % m_group == 0, choose, lambda m1: m1, m1)
            col = w1[:, i]
            q = jnp.where(m1[:, i], col, 0.0)
            err = (col - q) / u1[i, i]
            w1 = (w1 - err[:, None] * u1[i][None, :]).at[:, i].set(q)
            return w1, m1, e1.at[:, i].set(err)

        w1, m1, e1 = jax.lax.fori_loop(0, block, column, (w1, m1, jnp.zeros_like(w1)), unroll=8)
        w = jax.lax.dynamic_update_slice(w, w1, (0, i1))
        mask = jax.lax.dynamic_update_slice(mask, m1, (0, i1))
        # Lazy update: the block's errors reach every later column in one matmul.
        later = jnp.arange(total) >= i1 + block
        urows = jax.lax.dynamic_slice(u, (i1, 0), (block, total))
        return w - (e1 @ urows) * later[None, :], mask

    init = (w, jnp.zeros((rows, total), bool))
    return jax.lax.fori_loop(0, total // block, block_step, init)


def fast_obs(
    w: jax.Array,
    h: jax.Array,
    k: int | None = None,
    *,
    nm: tuple[int, int] | None = None,
    block: int = 128,
    quota: Literal["layer", "block"] = "layer",
    damp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT-style OBS: prune ``W`` (``d_out x d_in``) to ``k`` weights in one sweep.

    With ``U`` the upper Cholesky factor of ``(H + damp)^-1``, walk the input
    columns in order; for column ``i`` with keep mask ``m``:
    ``err = (w_i - m * w_i) / U_ii``, ``W[:, i:] -= err U[i, i:]``. Updates of
    later blocks of ``block`` columns are batched (lazy) into one matmul per
    block. ``O(d_in^3)`` for ``U`` and ``O(d_out d_in^2)`` for the sweep.

    When the sweep reaches a block it keeps that block's quota of weights,
    the largest ``w^2 / U_ii^2`` of its current (already updated) values.
    The quotas:

    * ``quota="layer"`` (default): chosen over the whole layer -- each
      block's share of ``k`` is its share of the layer-wide top-``k`` of the
      OBS saliency ``w^2 / [H^-1]_ii``, so the budget goes where the layer
      needs it (on MNIST's fc1, not to the dead border pixels);
    * ``quota="block"``: as published, ``k`` spread over the blocks in
      proportion to their size;
    * ``nm=(N, M)``: in every group of ``M`` consecutive inputs each row keeps
      the ``N`` best, chosen when the sweep reaches the group (``k`` is then
      implied).

    Returns:
        ``(W', mask)`` with ``W'`` zero off the mask.
    """
    from admmprune.budgets import _largest_remainder

    rows, cols = w.shape
    if nm is not None:
        n_keep, m_group = (int(v) for v in nm)
        if not 0 <= n_keep <= m_group or cols % m_group:
            raise ValueError(
                f"N:M needs 0 <= N <= M and M dividing d_in={cols}; got {n_keep}:{m_group}."
            )
        block = max(m_group, block - block % m_group)
        k = n_keep * rows * cols // m_group
    elif k is None:
        raise ValueError("fast_obs needs k= (weights kept in the layer) or nm=(N, M).")
    if quota not in ("layer", "block"):
        raise ValueError(f"quota must be 'layer' or 'block', got {quota!r}.")
    k = _check_count(w, k)
    if nm is None:
        block = min(block, cols)
    pad = (-cols) % block
    nb = (cols + pad) // block
    with jax.enable_x64(True):
        hd = damped(jnp.asarray(h, jnp.float64), damp)
        if pad:
            hd = jax.scipy.linalg.block_diag(hd, jnp.eye(pad, dtype=hd.dtype))
        u = inverse_cholesky_upper(hd)
        # diag(H^-1) = column sums of U * U (H^-1 = U^T U): no inverse needed.
        hinv_diag = np.asarray(jnp.sum(u * u, axis=0))[:cols]
    u = u.astype(w.dtype)
    wp = jnp.pad(w, ((0, 0), (0, pad)))
    if nm is not None:
        quotas = np.zeros(nb)
    elif quota == "layer":
        saliency = jnp.asarray(np.asarray(w, np.float64) ** 2 / hinv_diag[None, :])
        ranked = np.asarray(topk_mask_flat(saliency.ravel(), k)).reshape(rows, cols)
        quotas = np.pad(ranked.sum(0), (0, pad)).reshape(nb, block).sum(1)
    else:
        quotas = np.asarray(
            _largest_remainder(k, [rows * min(block, cols - block * b) for b in range(nb)])
        )
    out, mask = _sweep(
        wp,
        u,
        jnp.asarray(quotas, jnp.int32),
        cols,
        block,
        None if nm is None else (n_keep, m_group),
    )
    return out[:, :cols], mask[:, :cols]


# ------------------------------------------------------------------ exact OBS
@functools.partial(jax.jit, static_argnames=("batch",))
def _obc_orders(w: jax.Array, hinv: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    cols = w.shape[1]

    def row(w: jax.Array) -> tuple[jax.Array, jax.Array]:
        def step(t: jax.Array, c: Any) -> Any:
            w, hi, alive, order, loss = c
            d = jnp.where(alive, jnp.diagonal(hi), 1.0)
            score = jnp.where(alive, w**2 / d, jnp.inf)
            q = jnp.argmin(score)
            hq = hi[:, q]
            w = (w - w[q] / d[q] * hq).at[q].set(0.0)
            hi = hi - jnp.outer(hq, hq) / d[q]
            alive = alive.at[q].set(False)
            return w, hi, alive, order.at[t].set(q.astype(jnp.int32)), loss.at[t].set(score[q] / 2)

        init = (
            w,
            hinv,
            jnp.ones((cols,), bool),
            jnp.zeros((cols,), jnp.int32),
            jnp.zeros((cols,), w.dtype),
        )
        _, _, _, order, loss = jax.lax.fori_loop(0, cols, step, init)
        return order, loss

    return jax.lax.map(row, w, batch_size=batch)


def obc_curves(
    w: jax.Array, h: jax.Array, *, damp: float = 0.01, batch: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy exact OBS on every row, down to zero weights (OBC).

    Row ``i`` removes, one at a time, the weight of least
    ``w_q^2 / (2 [H^-1]_qq)``, moves the others by
    ``-(w_q / [H^-1]_qq) H^-1 e_q`` and downdates
    ``H^-1 -= H^-1 e_q e_q^T H^-1 / [H^-1]_qq``, all in float64.

    Returns:
        ``(order, loss)``, each ``(d_out, d_in)``: the removal order of every
        row and the loss each removal adds.
    """
    with jax.enable_x64(True):
        hd = damped(jnp.asarray(h, jnp.float64), damp)
        hinv = cho_solve(cho_factor(hd), jnp.eye(hd.shape[0], dtype=hd.dtype))
        order, loss = _obc_orders(jnp.asarray(w, jnp.float64), hinv, batch)
    return np.asarray(order), np.asarray(loss)


def joint_mask(order: np.ndarray, loss: np.ndarray, k: int) -> np.ndarray:
    """The layer's mask of ``k`` weights from every row's greedy loss curve.

    Each row's added losses are made nondecreasing (running maximum), so
    choosing the ``d_out d_in - k`` smallest over the layer removes a prefix
    of every row's greedy order.
    """
    rows, cols = order.shape
    remove = rows * cols - k
    mono = np.maximum.accumulate(loss, axis=1)
    flat = np.argsort(mono.ravel(), kind="stable")[:remove]
    counts = np.bincount(flat // cols, minlength=rows)
    removed = np.arange(cols)[None, :] < counts[:, None]  # first counts[i] of row i's order
    mask = np.ones((rows, cols), bool)
    np.put_along_axis(mask, order, ~removed, axis=1)
    return mask


def exact_obs(
    w: jax.Array,
    h: jax.Array,
    k: int,
    *,
    damp: float = 0.01,
    batch: int = 4,
    max_flops: float = 2e12,
) -> tuple[jax.Array, jax.Array]:
    """OBC: greedy exact OBS per row, the mask chosen jointly over the layer, then refit.

    The sequence of OBS updates along a removal order ends at the least-
    squares optimum of the kept weights, so the weights are those of
    :func:`refit` on the chosen mask.

    Raises:
        ValueError: when ``2 d_out d_in^3`` exceeds ``max_flops`` (use
            :func:`fast_obs` for such a layer, or raise the limit).
    """
    k = _check_count(w, k)
    rows, cols = w.shape
    if 2.0 * rows * cols**3 > max_flops:
        raise ValueError(
            f"exact OBS on a {rows} x {cols} layer costs about {2.0 * rows * cols**3:.1e} "
            f"flops (> max_flops={max_flops:.0e}); use fast_obs, or raise max_flops."
        )
    order, loss = obc_curves(w, h, damp=damp, batch=batch)
    mask = jnp.asarray(joint_mask(order, loss, k))
    return refit(w, h, mask, damp=damp), mask


def reconstruction_error(w: jax.Array, w_new: jax.Array, h: jax.Array) -> float:
    """``||X W^T - X W'^T||^2 / ||X W^T||^2 = tr(D H D^T) / tr(W H W^T)``, ``D = W - W'``."""
    with jax.enable_x64(True):
        h = jnp.asarray(h, jnp.float64)
        w64 = jnp.asarray(w, jnp.float64)
        d = w64 - jnp.asarray(w_new, jnp.float64)
        den = jnp.sum((w64 @ h) * w64)
        return float(jnp.sum((d @ h) * d) / jnp.where(den > 0, den, 1.0))


def prune_matrix(
    method: Method,
    w: jax.Array,
    h: jax.Array,
    k: int,
    *,
    damp: float = 0.01,
    block: int = 128,
    nm: tuple[int, int] | None = None,
    quota: Literal["layer", "block"] = "layer",
) -> tuple[jax.Array, jax.Array]:
    """One layer, ``W`` as ``d_out x d_in``, by ``method``; returns ``(W', mask)``."""
    if method == "magnitude":
        mask = magnitude_mask(w, k)
        return jnp.where(mask, w, 0.0), mask
    if method == "wanda":
        mask = wanda_mask(w, h, k)
        return jnp.where(mask, w, 0.0), mask
    if method == "refit":
        mask = magnitude_mask(w, k)
        return refit(w, h, mask, damp=damp), mask
    if method == "fast_obs":
        return fast_obs(w, h, k, nm=nm, block=block, damp=damp, quota=quota)
    if method == "exact_obs":
        return exact_obs(w, h, k, damp=damp)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}.")


def kernel_rows(kernel: jax.Array) -> jax.Array:
    """A dense or conv kernel (``(..., d_out)``, flax layout) as ``W``, ``d_out x d_in``."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def prune_layerwise(
    model: nnx.Module,
    params: PyTree,
    x: jax.Array,
    counts: Mapping[str, int] | None,
    method: Method = "fast_obs",
    *,
    masks: PyTree | None = None,
    damp: float = 0.01,
    block: int = 128,
    nm: tuple[int, int] | None = None,
    quota: Literal["layer", "block"] = "layer",
    sequential: bool = True,
) -> tuple[PyTree, PyTree, list[dict[str, Any]]]:
    """Prunes the kernels named in ``counts`` to those counts, one layer at a time.

    With ``masks`` (a boolean pytree like ``params``) instead of ``counts``,
    the masks are kept as given and every dense/conv kernel whose mask
    prunes something gets the exact refit of its kept weights (``method``
    is then ignored): OBS compensation for a mask chosen elsewhere, such as
    ADMM's hard prune. Layers run in call order. With ``sequential`` (the default, as in OBC
    and SparseGPT) each layer's Hessian comes from calibration inputs that
    pass through the already-pruned layers before it; otherwise every layer
    sees the dense network's inputs.

    Returns:
        ``(pruned params, masks, per-layer records)``; a record has the layer's
        name, shape, kept count and relative reconstruction error
        ``||X W - X W'||^2 / ||X W||^2`` on its calibration inputs.
    """
    names = leaf_names(params)
    fixed: dict[str, jax.Array] = {}
    if masks is not None:
        fixed = {
            n: m for n, m in zip(names, jax.tree.leaves(masks), strict=True) if not bool(jnp.all(m))
        }
        counts = {n: int(jnp.sum(m)) for n, m in fixed.items()}
    elif counts is None:
        raise ValueError("prune_layerwise needs counts= or masks=.")
    unknown = sorted(set(counts) - set(names))
    if unknown:
        raise ValueError(f"counts names {unknown}, which are not leaves; leaves are {names}.")
    leaves, treedef = jax.tree.flatten(params)
    index = {n: i for i, n in enumerate(names)}
    dense_inputs = calibration_inputs(model, params, x)
    # A structured mask also covers biases and norm parameters: they are masked, not refit.
    passed = {n for n in fixed if n not in dense_inputs and np.ndim(leaves[index[n]]) < 2}
    missing = sorted(set(counts) - set(dense_inputs) - passed)
    if missing:
        raise ValueError(
            f"{missing} are not kernels of dense or conv layers the model calls; "
            f"those are {list(dense_inputs)}."
        )
    records = []
    out_masks = [jnp.ones(np.shape(leaf), bool) for leaf in leaves]
    for name in passed:
        i = index[name]
        out_masks[i] = fixed[name]
        leaves[i] = jnp.where(fixed[name], leaves[i], jnp.zeros_like(leaves[i]))
    for name in dense_inputs:
        if name not in counts:
            continue
        if sequential:
            current = jax.tree.unflatten(treedef, leaves)
            xl = calibration_inputs(model, current, x)[name]
        else:
            xl = dense_inputs[name]
        h = hessian(xl)
        kernel = leaves[index[name]]
        w = kernel_rows(kernel)
        if name in fixed:
            mask = kernel_rows(fixed[name])
            w_new = refit(w, h, mask, damp=damp)
        else:
            k = int(counts[name])
            w_new, mask = prune_matrix(method, w, h, k, damp=damp, block=block, nm=nm, quota=quota)
        leaves[index[name]] = w_new.T.reshape(kernel.shape).astype(kernel.dtype)
        out_masks[index[name]] = mask.T.reshape(kernel.shape)
        records.append(
            {
                "name": name,
                "shape": list(w.shape),
                "kept": int(jnp.sum(mask)),
                "size": int(w.size),
                "relative_error": reconstruction_error(w, w_new, h),
            }
        )
    return jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(treedef, out_masks), records


def compensator(
    model: nnx.Module, x: jax.Array, *, damp: float = 0.01
) -> Callable[[PyTree, PyTree], PyTree]:
    """``compensate(params, masks)``: OBS compensation for a given mask (ADMM's hard prune).

    Each masked layer's kept weights become the least-squares fit of its
    unpruned output on the calibration inputs ``x``, layer by layer through
    the already-compensated layers (:func:`prune_layerwise` with ``masks``).
    """

    def compensate(params: PyTree, masks: PyTree) -> PyTree:
        return prune_layerwise(model, params, x, None, masks=masks, damp=damp)[0]

    return compensate


__all__ = [
    "METHODS",
    "calibration_inputs",
    "compensator",
    "damped",
    "exact_obs",
    "fast_obs",
    "hessian",
    "inverse_cholesky_upper",
    "joint_mask",
    "kernel_rows",
    "layer_matrix",
    "magnitude_mask",
    "obc_curves",
    "prune_layerwise",
    "prune_matrix",
    "reconstruction_error",
    "refit",
    "wanda_mask",
]
