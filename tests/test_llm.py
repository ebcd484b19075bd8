"""The GGUF Llama loader, its tokenizer and perplexity, on tiny models the tests write."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import jax.numpy as jnp

from admmprune.llm.gguf_io import (
    GGUFError,
    expected_shapes,
    load_llama,
    model_tensors,
    read_gguf,
    write_gguf,
)
from admmprune.llm.llama import LlamaConfig, forward_fn
from admmprune.llm.text import (
    TextError,
    calibration_windows,
    encode,
    eval_windows,
    perplexity,
    read_text,
)
from admmprune.llm.tokenizer import gguf_tokenizer

CONFIG = LlamaConfig(
    vocab_size=0,  # set from the vocabulary below
    dim=32,
    hidden_dim=48,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    rope_theta=10000.0,
    norm_eps=float(np.float32(1e-5)),  # GGUF stores it as float32
    context_length=64,
)
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġa n", "Ġan d"]


def _vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: 256 byte symbols, the merges' products, two controls."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet())
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    tokens += ["<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]
    return tokens, MERGES, types


def _metadata(pre: str = "smollm") -> dict:
    tokens, merges, types = _vocab()
    return {
        "general.name": "tiny",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": len(tokens) - 2,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
    }


def _config() -> LlamaConfig:
    import dataclasses

    return dataclasses.replace(CONFIG, vocab_size=len(_vocab()[0]))


def _random_tensors(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return out


@pytest.fixture
def tiny(tmp_path):
    config = _config()
    tensors = _random_tensors(config)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, tensors, _metadata(), dtype="F32")
    return path, config, tensors


def _reference_logits(t: dict[str, np.ndarray], c: LlamaConfig, tokens: np.ndarray) -> np.ndarray:
    """An independent float64 numpy Llama: (out, in) weights, RoPE on complex pairs."""

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.norm_eps) * w

    d = c.head_dim
    s = tokens.shape[0]
    h = t["token_embd.weight"].astype(np.float64)[tokens]
    freqs = c.rope_theta ** (-np.arange(0, d, 2) / d)
    rot = np.exp(1j * np.arange(s)[:, None] * freqs[None, :])  # (s, d/2)

    def rope(x):  # (s, heads, d): pairs (2i, 2i+1) as complex numbers
        z = x[..., 0::2] + 1j * x[..., 1::2]
        z = z * rot[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    for i in range(c.n_layers):
        w = {
            k.split(".", 2)[2][: -len(".weight")]: v
            for k, v in t.items()
            if k.startswith(f"blk.{i}.")
        }
        a = rms(h, w["attn_norm"])
        q = (a @ w["attn_q"].T).reshape(s, c.n_heads, d)
        k = (a @ w["attn_k"].T).reshape(s, c.n_kv_heads, d)
        v = (a @ w["attn_v"].T).reshape(s, c.n_kv_heads, d)
        q, k = rope(q), rope(k)
        heads = []
        for hd in range(c.n_heads):
            g = hd // (c.n_heads // c.n_kv_heads)
            scores = q[:, hd] @ k[:, g].T / np.sqrt(d)
            scores[np.triu(np.ones((s, s), bool), 1)] = -np.inf
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            heads.append(p @ v[:, g])
        h = h + np.concatenate(heads, axis=-1) @ w["attn_output"].T
        m = rms(h, w["ffn_norm"])
        gate = m @ w["ffn_gate"].T
        h = h + ((gate / (1 + np.exp(-gate))) * (m @ w["ffn_up"].T)) @ w["ffn_down"].T
    return rms(h, t["output_norm.weight"]) @ t["token_embd.weight"].T


def test_forward_pass_matches_an_independent_numpy_llama(tiny):
    path, config, tensors = tiny
    model, file = load_llama(path)
    assert file.config == config and file.config.tied_embeddings
    params, apply = forward_fn(model)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, 24).astype(np.int32)
    got = np.asarray(apply(params, jnp.asarray(tokens[None])))[0]
    want = _reference_logits(tensors, config, tokens)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # Causal: a window's first logits do not depend on what follows.
    head = np.asarray(apply(params, jnp.asarray(tokens[None, :10])))[0]
    np.testing.assert_allclose(head, got[:10], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("dtype", "tol"), [("F32", 0.0), ("F16", 2e-3), ("Q8_0", 2e-2)])
def test_written_file_reads_back_with_zeros_kept(tmp_path, tiny, dtype, tol):
    path, config, _ = tiny
    model, file = load_llama(path)
    pruned = model_tensors(model)
    w = pruned["blk.0.ffn_up.weight"]
    w[:, ::2] = 0.0  # 50% of a layer pruned
    out = tmp_path / f"pruned-{dtype}.gguf"
    write_gguf(out, file.config, pruned, file.metadata, dtype=dtype)
    back = read_gguf(out)
    assert back.config == config
    assert back.metadata["tokenizer.ggml.merges"] == MERGES
    for name, array in pruned.items():
        np.testing.assert_allclose(back.tensors[name], array, atol=tol * np.abs(array).max())
    assert np.all(back.tensors["blk.0.ffn_up.weight"][:, ::2] == 0.0)  # zeros stay exact
    assert back.types["blk.0.ffn_up.weight"] == dtype and back.types["output_norm.weight"] == "F32"
    # ffn_down's rows (48 inputs) are not whole Q8_0 blocks: written as F16.
    assert back.types["blk.0.ffn_down.weight"] == ("F16" if dtype == "Q8_0" else dtype)


def test_tokenizer_splits_digits_keeps_controls_and_round_trips(tiny):
    path, _, _ = tiny
    tok = gguf_tokenizer(read_gguf(path))
    tokens = _vocab()[0]
    text = "the cat and 2024 <|im_start|>in"
    ids = tok.encode(text).ids
    pieces = [tokens[i] for i in ids]
    assert "Ġand" in pieces and "Ġthe" not in pieces  # merges applied (no space before "the")
    assert [p for p in pieces if p in "0123456789"] == ["2", "0", "2", "4"]  # digit by digit
    assert "<|im_start|>" in pieces  # a control token is matched whole
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_uniform_model_has_the_vocabulary_as_perplexity(tmp_path):
    config = _config()
    tensors = {k: np.zeros_like(v) for k, v in _random_tensors(config).items()}
    path = tmp_path / "zero.gguf"
    write_gguf(path, config, tensors, _metadata(), dtype="F32")
    model, _ = load_llama(path)
    params, apply = forward_fn(model)
    windows = np.random.default_rng(0).integers(0, config.vocab_size, (3, 16)).astype(np.int32)
    r = perplexity(lambda x: apply(params, x), windows, batch=2)
    assert r["tokens"] == 3 * 15
    assert r["perplexity"] == pytest.approx(config.vocab_size, rel=1e-5)


def test_text_windows_and_their_errors(tmp_path, tiny):
    path, _, _ = tiny
    tok = gguf_tokenizer(read_gguf(path))
    f = tmp_path / "wiki.raw"
    f.write_text(" = Title = \n\n the cat and the hat \n")
    text = read_text(f)
    # rows " = Title = \n", "", " the cat ... \n" joined by "\n\n" (SparseGPT):
    assert text == " = Title = \n\n\n\n\n the cat and the hat \n"
    ids = encode(tok, text * 20)
    windows = eval_windows(ids, 16)
    assert windows.shape == (len(ids) // 16, 16)
    np.testing.assert_array_equal(windows.ravel(), ids[: windows.size])
    calib = calibration_windows(ids, 5, 16, seed=3)
    assert calib.shape == (5, 16)
    np.testing.assert_array_equal(calib, calibration_windows(ids, 5, 16, seed=3))
    with pytest.raises(TextError, match="fewer than one window of 4096"):
        eval_windows(ids, 4096)
    with pytest.raises(TextError, match="fewer than one window"):
        calibration_windows(ids[:10], 2, 16, seed=0)
    with pytest.raises(TextError, match="no such text file"):
        read_text(tmp_path / "missing.raw")


def test_bad_files_are_named(tmp_path, tiny):
    from gguf import GGMLQuantizationType, GGUFWriter

    _, config, tensors = tiny
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        read_gguf(not_gguf)
    other = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(other), "gpt2")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'gpt2'"):
        read_gguf(other)
    # A quantization the loader does not read: IQ4_NL (18 bytes per 32 weights).
    odd = tmp_path / "iq4.gguf"
    write_gguf(odd, config, tensors, _metadata(), dtype="F32")
    w = GGUFWriter(str(odd), "llama")
    w.add_block_count(config.n_layers)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_tensor(
        "token_embd.weight",
        np.zeros((config.vocab_size, config.dim // 32 * 18), np.uint8),  # the byte shape
        raw_dtype=GGMLQuantizationType.IQ4_NL,
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"token_embd\.weight is stored as IQ4_NL"):
        read_gguf(odd)
    with pytest.raises(GGUFError, match="choose one of F32, F16, Q8_0"):
        write_gguf(tmp_path / "x.gguf", config, tensors, _metadata(), dtype="Q4_1")
    meta = _metadata() | {"tokenizer.ggml.pre": "qwen2"}
    write_gguf(tmp_path / "q.gguf", config, tensors, meta, dtype="F32")
    with pytest.raises(GGUFError, match="'qwen2'"):
        gguf_tokenizer(read_gguf(tmp_path / "q.gguf"))


def test_real_smollm2_when_cached():
    """The real model, only when its verified file is already in the cache (no download)."""
    from admmprune.data import DataError
    from admmprune.llm.fetch import smollm2_path

    try:
        path = smollm2_path(download=False)
    except DataError:
        pytest.skip("SmolLM2-135M is not in the cache (admmprune fetch-data --dataset smollm2)")
    model, file = load_llama(path)
    assert file.config.n_layers == 30 and file.config.dim == 576
    assert file.types["blk.0.ffn_up.weight"] == "Q4_1" and file.types["token_embd.weight"] == "Q8_0"
    tok = gguf_tokenizer(file)
    ids = tok.encode("The capital of France is").ids
    params, apply = forward_fn(model)
    logits = np.asarray(apply(params, jnp.asarray([ids])))[0, -1]
    assert tok.decode([int(np.argmax(logits))]).strip() == "Paris"
