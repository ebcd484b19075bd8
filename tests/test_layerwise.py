"""Layer-wise ADMM against SparseGPT, the exact refit, and brute force on tiny layers."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from admmprune import obs
from admmprune.layerwise import LayerADMM, admm_prune


def _layer(rows: int, cols: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights and H = X^T X / n from correlated inputs with a few large features (as in LLMs)."""
    rng = np.random.default_rng(seed)
    mix = np.eye(cols) + 2 * rng.standard_normal((cols, cols)) / np.sqrt(cols)
    x = (rng.standard_normal((n, cols)) @ mix).astype(np.float32)
    x[:, :3] *= 10
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return w, obs.hessian(jnp.asarray(x))


@pytest.mark.parametrize("sparsity", [0.5, 0.8, "2:4"])
def test_admm_reconstructs_better_than_sparsegpt(sparsity):
    w, h = _layer(32, 64, 256, seed=0)
    if sparsity == "2:4":
        args, kw = (None,), {"nm": (2, 4)}
    else:
        args, kw = (int(w.size * (1 - sparsity)),), {}
    wa, ma, info = admm_prune(jnp.asarray(w), h, *args, **kw)
    ws, _ = obs.fast_obs(jnp.asarray(w), h, *args, quota="block", **kw)
    ea, es = obs.reconstruction_error(w, wa, h), obs.reconstruction_error(w, ws, h)
    assert ea < 0.8 * es, (ea, es)
    assert np.all(np.asarray(wa)[~np.asarray(ma)] == 0)
    if sparsity == "2:4":
        assert np.all(np.asarray(ma).reshape(32, 16, 4).sum(-1) == 2)
    else:
        assert int(ma.sum()) == args[0]
    assert info["support_changes"][-1] == 0 and info["cg_residual"] < 1e-6


def test_final_weights_are_the_exact_least_squares_refit():
    w, h = _layer(16, 48, 200, seed=1)
    wa, mask, _ = admm_prune(jnp.asarray(w), h, 300)
    exact = obs.refit(jnp.asarray(w), h, mask, damp=LayerADMM().damp)
    np.testing.assert_allclose(np.asarray(wa), np.asarray(exact), atol=2e-5)


def test_tiny_layer_reaches_the_best_support():
    # 2 x 6 weights, keep 5: every one of C(12, 5) = 792 supports refit exactly.
    w, h = _layer(2, 6, 40, seed=2)
    hd = np.asarray(obs.damped(jnp.asarray(h), 0.01))
    best = np.inf
    for keep in itertools.combinations(range(12), 5):
        mask = np.zeros(12, bool)
        mask[list(keep)] = True
        refit = np.asarray(obs.refit(jnp.asarray(w), h, jnp.asarray(mask.reshape(2, 6))))
        d = (w - refit).astype(np.float64)
        best = min(best, float(np.sum((d @ hd) * d)))
    wa, _, _ = admm_prune(jnp.asarray(w), h, 5)
    d = (w - np.asarray(wa)).astype(np.float64)
    assert float(np.sum((d @ hd) * d)) <= best * (1 + 1e-4)


def test_bad_settings_are_named():
    w, h = _layer(4, 8, 20, seed=3)
    with pytest.raises(ValueError, match=r"keep count 40 is outside \[0, 32\]"):
        admm_prune(jnp.asarray(w), h, 40)
    with pytest.raises(ValueError, match="M dividing d_in=8"):
        admm_prune(jnp.asarray(w), h, nm=(2, 3))


def test_a_shared_factorization_gives_the_same_result_and_float64_agrees():
    """``factorize`` once for matrices with one H (q, k, v) changes nothing; the float32
    iterations find the float64 support's error to within 1%."""
    from admmprune.layerwise import factorize

    w, h = _layer(24, 64, 256, seed=3)
    alone, _, _ = admm_prune(jnp.asarray(w), h, 600)
    shared, _, _ = admm_prune(jnp.asarray(w), None, 600, factored=factorize(h))
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(shared))
    wide, _, _ = admm_prune(jnp.asarray(w), h, 600, settings=LayerADMM(dtype="float64"))
    e32, e64 = (obs.reconstruction_error(w, x, h) for x in (alone, wide))
    assert e32 <= 1.01 * e64, (e32, e64)
    with pytest.raises(ValueError, match="factored H is"):
        admm_prune(jnp.asarray(w[:, :32]), None, 100, factored=factorize(h))
    with pytest.raises(ValueError, match="dtype must be"):
        LayerADMM(dtype="float16")
