"""A Llama-architecture decoder as a flax nnx module (RMSNorm, RoPE, GQA, SwiGLU).

The block, for hidden states ``h`` of shape ``(batch, seq, dim)``::

    a = RMSNorm(h) ;  q, k, v = a Wq, a Wk, a Wv ;  q, k = RoPE(q), RoPE(k)
    h = h + softmax(q k^T / sqrt(d_head) + causal) v Wo
    m = RMSNorm(h) ;  h = h + (silu(m Wgate) * (m Wup)) Wdown

with ``n_kv_heads`` key/value heads shared by ``n_heads / n_kv_heads`` query
heads each (grouped-query attention). RoPE rotates *adjacent* pairs
``(x_{2i}, x_{2i+1})`` by ``p * theta^(-2i / d_head)`` at position ``p``:
llama.cpp's convention, for which GGUF converters permute the query and key
rows of a Hugging Face checkpoint, so the weights of a GGUF file are used as
they are. Kernels are flax's ``(in, out)``, the transpose of GGUF's
``(out, in)`` rows.

References:
    H. Touvron et al., "LLaMA: open and efficient foundation language
    models", 2023; J. Su et al., "RoFormer", 2021 (RoPE); J. Ainslie et al.,
    "GQA", EMNLP 2023; N. Shazeer, "GLU variants improve Transformer", 2020.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama decoder (the ``llama.*`` keys of a GGUF file)."""

    vocab_size: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    context_length: int = 2048
    tied_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` of each of a block's seven linear layers."""
        kv = self.n_kv_heads * self.head_dim
        d, f = self.dim, self.hidden_dim
        return {
            "attn_q": (d, d),
            "attn_k": (d, kv),
            "attn_v": (d, kv),
            "attn_output": (d, d),
            "ffn_gate": (d, f),
            "ffn_up": (d, f),
            "ffn_down": (f, d),
        }


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale * self.weight[...]).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of adjacent pairs; ``x`` is ``(batch, seq, heads, d_head)``."""
    d = x.shape[-1]
    freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]  # (seq, d/2)
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class Block(nnx.Module):
    """One decoder block: attention and SwiGLU MLP, each pre-normed and residual."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs) -> None:
        self.config = config
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        for name, (fan_in, fan_out) in config.linear_shapes().items():
            setattr(self, name, nnx.Linear(fan_in, fan_out, use_bias=False, rngs=rngs))

    def attention(self, a: jax.Array) -> jax.Array:
        """Causal grouped-query self-attention of the normed input ``a`` (before Wo)."""
        c = self.config
        b, s, _ = a.shape
        q = self.attn_q(a).reshape(b, s, c.n_heads, c.head_dim)
        k = self.attn_k(a).reshape(b, s, c.n_kv_heads, c.head_dim)
        v = self.attn_v(a).reshape(b, s, c.n_kv_heads, c.head_dim)
        positions = jnp.arange(s)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        group = c.n_heads // c.n_kv_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(c.head_dim)
        causal = jnp.tril(jnp.ones((s, s), bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, c.dim)

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.attn_output(self.attention(self.attn_norm(h)))
        m = self.ffn_norm(h)
        return h + self.ffn_down(jax.nn.silu(self.ffn_gate(m)) * self.ffn_up(m))


class Llama(nnx.Module):
    """The decoder: token embedding, ``n_layers`` blocks, final RMSNorm, output head.

    ``model(tokens)`` maps int tokens ``(batch, seq)`` to logits ``(batch, seq,
    vocab)``. With tied embeddings the head is the embedding matrix.
    """

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs) -> None:
        self.config = config
        init = jax.nn.initializers.normal(0.02)
        self.token_embd = nnx.Param(init(rngs.params(), (config.vocab_size, config.dim)))
        self.blk = nnx.List([Block(config, rngs) for _ in range(config.n_layers)])
        self.output_norm = RMSNorm(config.dim, config.norm_eps)
        self.output = (
            None
            if config.tied_embeddings
            else nnx.Param(init(rngs.params(), (config.vocab_size, config.dim)))
        )

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.token_embd[...], tokens, axis=0)

    def head(self, h: jax.Array) -> jax.Array:
        table = self.token_embd if self.output is None else self.output
        return self.output_norm(h) @ table[...].T

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        for block in self.blk:
            h = block(h)
        return self.head(h)


def forward_fn(model: Llama) -> tuple[Any, Any]:
    """``(params, apply)`` with ``apply(params, tokens) -> logits`` one jitted function."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def apply(p: Any, tokens: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, p)(tokens)

    return params, apply


__all__ = ["LINEARS", "Block", "Llama", "LlamaConfig", "RMSNorm", "forward_fn", "rope"]
