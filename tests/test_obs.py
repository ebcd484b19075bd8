"""Layer-wise OBS: closed forms against brute force, solvers against magnitude pruning."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from admmprune import obs


def correlated_layer(seed: int, n: int = 512, d_in: int = 24, d_out: int = 6):
    # AR(1) inputs, corr(x_i, x_j) = 0.9^|i-j|: strongly correlated, well conditioned.
    rng = np.random.default_rng(seed)
    idx = np.arange(d_in)
    chol = np.linalg.cholesky(0.9 ** np.abs(idx[:, None] - idx[None, :]))
    x = (rng.standard_normal((n, d_in)) @ chol.T).astype(np.float32)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), obs.hessian(jnp.asarray(x))


def best_with_support(w: np.ndarray, h: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, float]:
    """Brute force: the kept weights minimizing (w' - w)^T H (w' - w), and that loss / 2."""
    k = np.flatnonzero(keep)
    out = np.zeros_like(w)
    if k.size:
        out[k] = np.linalg.solve(h[np.ix_(k, k)], h[k] @ w)
    d = out - w
    return out, 0.5 * d @ h @ d


def test_one_removal_matches_the_obs_closed_form_and_brute_force():
    _, w, h = correlated_layer(0, d_in=7, d_out=3)
    hd = np.asarray(h)  # float64
    hinv = np.linalg.inv(hd)  # the oracle may invert; the library does not
    order, loss = obs.obc_curves(w, hd, damp=0.0)
    for i, row in enumerate(np.asarray(w, np.float64)):
        brute = []
        for q in range(row.size):
            keep = np.ones(row.size, bool)
            keep[q] = False
            best, cost = best_with_support(row, hd, keep)
            closed = row[q] ** 2 / (2 * hinv[q, q])
            update = row - row[q] / hinv[q, q] * hinv[:, q]
            assert cost == pytest.approx(closed, rel=1e-8)
            np.testing.assert_allclose(update, best, atol=1e-9)
            brute.append(cost)
        assert order[i, 0] == int(np.argmin(brute))
        assert loss[i, 0] == pytest.approx(min(brute), rel=1e-8)


def test_refit_is_the_least_squares_optimum_of_every_row():
    _, w, h = correlated_layer(1, d_in=8, d_out=4)
    rng = np.random.default_rng(0)
    mask = rng.random(w.shape) < 0.5
    got = np.asarray(obs.refit(w, h, jnp.asarray(mask), damp=0.0), np.float64)
    for i in range(w.shape[0]):
        want, _ = best_with_support(np.asarray(w[i], np.float64), np.asarray(h), mask[i])
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)


def test_exact_obs_is_close_to_the_brute_force_optimum_on_a_tiny_layer():
    # Greedy OBS is not optimal in general, but its joint mask + refit must
    # never beat the brute-force optimum and must meet it on this tiny case
    # within the greedy's known slack.
    _, w, h = correlated_layer(2, d_in=6, d_out=2)
    hd = np.asarray(h)
    w_new, _ = obs.exact_obs(w, hd, k=8, damp=0.0)
    got = 0.5 * sum(
        (np.asarray(w_new[i], np.float64) - np.asarray(w[i], np.float64))
        @ hd
        @ (np.asarray(w_new[i], np.float64) - np.asarray(w[i], np.float64))
        for i in range(2)
    )
    best = min(
        best_with_support(np.asarray(w[0], np.float64), hd, np.isin(np.arange(6), a))[1]
        + best_with_support(np.asarray(w[1], np.float64), hd, np.isin(np.arange(6), b))[1]
        for r in range(0, 7)
        if 0 <= 8 - r <= 6
        for a in itertools.combinations(range(6), r)
        for b in itertools.combinations(range(6), 8 - r)
    )
    assert got >= best - 1e-9
    assert got <= 1.5 * best + 1e-9


def test_inverse_cholesky_upper_factors_the_inverse():
    _, _, h = correlated_layer(3, d_in=16)
    with jax.enable_x64(True):
        hd = obs.damped(jnp.asarray(h), 0.01)
        u = np.asarray(obs.inverse_cholesky_upper(hd))
    assert np.allclose(np.tril(u, -1), 0.0)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(np.asarray(hd)), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", obs.METHODS)
def test_every_method_meets_its_count_exactly_and_zeroes_the_rest(method):
    _, w, h = correlated_layer(4)
    for k in (0, 1, 37, w.size):
        w_new, mask = obs.prune_matrix(method, w, h, k, block=8)
        assert int(np.sum(mask)) == k
        assert np.all(np.asarray(w_new)[~np.asarray(mask)] == 0)


def test_obs_solvers_beat_magnitude_and_exact_beats_fast_on_average():
    errors = {m: [] for m in ("magnitude", "fast_obs", "exact_obs")}
    for seed in range(6):
        _, w, h = correlated_layer(10 + seed, d_in=32, d_out=8)
        for m in errors:
            w_new, _ = obs.prune_matrix(m, w, h, int(0.25 * w.size), block=8)
            errors[m].append(obs.reconstruction_error(w, w_new, h))
    mean = {m: float(np.mean(v)) for m, v in errors.items()}
    assert mean["fast_obs"] < 0.6 * mean["magnitude"]
    assert mean["exact_obs"] < 0.6 * mean["magnitude"]
    assert mean["exact_obs"] <= mean["fast_obs"]


def test_compensation_reconstructs_better_than_zeroing_the_same_mask():
    _, w, h = correlated_layer(5)
    mask = obs.magnitude_mask(w, int(0.3 * w.size))
    zeroed = jnp.where(mask, w, 0.0)
    assert obs.reconstruction_error(w, obs.refit(w, h, mask), h) < 0.7 * (
        obs.reconstruction_error(w, zeroed, h)
    )
    w_fast, m_fast = obs.fast_obs(w, h, int(0.3 * w.size), block=8)
    assert obs.reconstruction_error(w, w_fast, h) < obs.reconstruction_error(
        w, jnp.where(m_fast, w, 0.0), h
    )


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 5),
    st.sampled_from([(1, 4), (2, 4), (4, 8), (0, 2)]),
    st.integers(0, 100),
)
def test_nm_output_satisfies_the_pattern(groups, nm, seed):
    n_keep, m = nm
    rng = np.random.default_rng(seed)
    d_in = groups * m
    x = jnp.asarray(rng.standard_normal((64, d_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, d_in)), jnp.float32)
    w_new, mask = obs.fast_obs(w, obs.hessian(x), nm=nm, block=8)
    per_group = np.asarray(mask).reshape(3, groups, m).sum(-1)
    assert np.all(per_group == n_keep)
    assert np.all(np.asarray(w_new)[~np.asarray(mask)] == 0)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.floats(0.0, 1.0), st.integers(1, 16))
def test_fast_obs_meets_any_layer_budget(d_in, d_out, keep, block):
    rng = np.random.default_rng(d_in * 7 + d_out)
    x = jnp.asarray(rng.standard_normal((32, d_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d_out, d_in)), jnp.float32)
    k = round(keep * w.size)
    for quota in ("layer", "block"):
        w_new, mask = obs.fast_obs(w, obs.hessian(x), k, block=block, quota=quota)
        assert int(np.sum(mask)) == k
        assert np.all(np.isfinite(np.asarray(w_new)))


def test_layer_quota_skips_dead_inputs_that_a_block_quota_keeps():
    # Half the inputs are dead (always zero, like MNIST's border pixels).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 32)).astype(np.float32)
    x[:, :16] = 0.0
    w = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    h = obs.hessian(jnp.asarray(x))
    _, layer = obs.fast_obs(w, h, 16, block=16, quota="layer")
    _, block = obs.fast_obs(w, h, 16, block=16, quota="block")
    assert int(np.sum(np.asarray(layer)[:, :16])) == 0
    assert int(np.sum(np.asarray(block)[:, :16])) == 8


def test_nm_rejects_a_width_it_cannot_tile():
    _, w, h = correlated_layer(6, d_in=10)
    with pytest.raises(ValueError, match="M dividing d_in=10"):
        obs.fast_obs(w, h, nm=(2, 4))


def test_exact_obs_refuses_a_layer_too_large_and_says_what_to_use():
    _, w, h = correlated_layer(7)
    with pytest.raises(ValueError, match="use fast_obs"):
        obs.exact_obs(w, h, 10, max_flops=10.0)


def test_joint_mask_removes_a_prefix_of_every_row_order():
    order = np.array([[2, 0, 1], [1, 2, 0]])
    loss = np.array([[0.1, 0.5, 0.9], [0.2, 0.3, 0.4]])
    mask = obs.joint_mask(order, loss, k=3)
    assert mask.sum() == 3
    np.testing.assert_array_equal(mask, [[True, True, False], [True, False, False]])


@pytest.mark.parametrize(("padding", "strides"), [("VALID", 1), ("SAME", 2), ((1, 1), 1)])
def test_conv_im2col_times_the_kernel_is_the_convolution(padding, strides):
    conv = nnx.Conv(3, 5, (3, 3), padding=padding, strides=strides, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    cols = obs.layer_matrix(conv, x)
    want = conv(x).reshape(-1, 5)
    got = cols @ conv.kernel[...].reshape(-1, 5) + conv.bias[...]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
