"""Sequential block-by-block pruning of a tiny Llama written by the tests."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import jax.numpy as jnp
from test_llm import _config, _metadata, _random_tensors

from admmprune.llm.gguf_io import load_llama, write_gguf
from admmprune.llm.llama import LINEARS, forward_fn
from admmprune.llm.pipeline import PRUNERS, Sparsity, prune_llama
from admmprune.llm.text import perplexity


@pytest.fixture
def tiny_path(tmp_path):
    config = _config()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, _random_tensors(config, seed=4), _metadata(), dtype="F32")
    return path


def _windows(vocab: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, 16)).astype(np.int32)


@pytest.mark.parametrize("sparsity", [Sparsity(fraction=0.5), Sparsity(nm=(2, 4))])
def test_every_pruner_meets_the_sparsity_and_admm_reconstructs_best(tiny_path, sparsity):
    errors = {}
    for method in PRUNERS:
        model, file = load_llama(tiny_path)
        v = file.config.vocab_size
        records = prune_llama(
            model,
            _windows(v, 12, 0),
            method=method,
            sparsity=sparsity,
            held_out=_windows(v, 4, 1),
            batch=4,
        )
        assert len(records) == file.config.n_layers * len(LINEARS)
        for r, block_layer in zip(
            records, [(b, n) for b in range(2) for n in LINEARS], strict=True
        ):
            assert (r["block"], r["layer"]) == block_layer
        for i, block in enumerate(model.blk):
            for name in LINEARS:
                w = np.asarray(getattr(block, name).kernel[...]).T
                if sparsity.nm:
                    groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
                    assert groups.max() <= 2, (method, i, name)
                else:
                    assert (w != 0).sum() <= w.size // 2, (method, i, name)
        params, apply = forward_fn(model)
        ppl = perplexity(lambda x, p=params, f=apply: f(p, x), _windows(v, 3, 2))["perplexity"]
        assert np.isfinite(ppl)
        errors[method] = np.mean([r["error"] for r in records])
        assert all(r["held_out_error"] is not None for r in records)
    assert errors["admm"] <= errors["sparsegpt"] <= errors["magnitude"], errors


def test_a_stopped_run_resumes_to_the_same_weights(tiny_path, tmp_path):
    model, file = load_llama(tiny_path)
    calib = _windows(file.config.vocab_size, 8, 0)
    whole = prune_llama(model, calib, method="sparsegpt", sparsity=Sparsity(fraction=0.6))
    first, _ = load_llama(tiny_path)
    ckpt = tmp_path / "ckpt"
    kwargs = {"method": "sparsegpt", "sparsity": Sparsity(fraction=0.6), "checkpoint": ckpt}
    part = prune_llama(first, calib, stop_after=1, **kwargs)
    assert {r["block"] for r in part} == {0}
    resumed, _ = load_llama(tiny_path)  # a fresh process: dense weights again
    records = prune_llama(resumed, calib, **kwargs)
    assert [r["error"] for r in records] == pytest.approx([r["error"] for r in whole], rel=1e-6)
    for a, b in zip(resumed.blk, model.blk, strict=True):
        for name in LINEARS:
            np.testing.assert_allclose(
                np.asarray(getattr(a, name).kernel[...]),
                np.asarray(getattr(b, name).kernel[...]),
                atol=1e-6,
            )
    with pytest.raises(ValueError, match="holds a checkpoint of"):
        other, _ = load_llama(tiny_path)
        prune_llama(other, calib, method="wanda", sparsity=Sparsity(fraction=0.6), checkpoint=ckpt)


def test_bad_settings_are_named(tiny_path):
    model, file = load_llama(tiny_path)
    calib = _windows(file.config.vocab_size, 2, 0)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        Sparsity(fraction=1.0)
    with pytest.raises(ValueError, match="does not divide attn_q's input width 32"):
        prune_llama(model, calib, method="admm", sparsity=Sparsity(nm=(2, 5)))
    with pytest.raises(ValueError, match="unknown pruner 'obc'"):
        prune_llama(model, calib, method="obc", sparsity=Sparsity(fraction=0.5))
    assert jnp.all(jnp.isfinite(model.blk[0].attn_q.kernel[...]))


MESH_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from admmprune.llm.gguf_io import load_llama
from admmprune.llm.pipeline import Sparsity, prune_llama

assert len(jax.devices()) == 4
path = sys.argv[1]
out = {}
for name, mesh in (("one", None), ("four", jax.make_mesh((4,), ("batch",)))):
    model, file = load_llama(path)
    calib = np.random.default_rng(0).integers(0, file.config.vocab_size, (8, 16)).astype(np.int32)
    records = prune_llama(
        model, calib, method="sparsegpt", sparsity=Sparsity(fraction=0.5), batch=4, mesh=mesh
    )
    out[name] = {
        "errors": [r["error"] for r in records],
        "kernel": np.asarray(model.blk[0].ffn_down.kernel[...]).tolist(),
    }
from admmprune.llm.pipeline import _placed
placed, _ = _placed(jax.make_mesh((4,), ("batch",)), calib[:4], {})
out["shards"] = len(placed.sharding.device_set)
json.dump(out, sys.stdout)
"""


def test_calibration_windows_split_over_four_devices_give_the_same_pruning(tiny_path):
    """The Hessians from windows sharded over 4 forced host devices are the one-device ones."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT, str(tiny_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["shards"] == 4  # the windows really were split
    np.testing.assert_allclose(out["four"]["errors"], out["one"]["errors"], rtol=1e-4)
    a, b = np.asarray(out["one"]["kernel"]), np.asarray(out["four"]["kernel"])
    assert np.array_equal(a != 0, b != 0)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
