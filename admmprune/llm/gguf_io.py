"""Read a Llama-architecture GGUF file into a :class:`~admmprune.llm.llama.Llama`; write one back.

GGUF (llama.cpp's format) holds the model's settings as typed key/value
pairs (``llama.block_count``, ``tokenizer.ggml.merges``, ...) and its tensors,
each in a storage type: F32, F16, BF16, or a block quantization (Q8_0: 32
weights share one scale; Q4_0/Q4_1: 4-bit codes with a scale, and for Q4_1
a minimum, per 32; the K-quants in super-blocks of 256). Reading uses the
``gguf`` package (numpy only) and its dequantization, so the dense model is
the dequantized weights: a quantized file's model carries its quantization
error. Tensor ``shape`` in GGUF lists the fastest axis first; ``gguf``
returns numpy arrays in row-major ``(out, in)`` order, transposed here to
flax's ``(in, out)`` kernels.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from admmprune.llm.llama import LINEARS, Llama, LlamaConfig

#: storage types the loader reads (others raise :class:`GGUFError` by name).
READABLE = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
#: types :func:`write_gguf` writes.
WRITABLE = ("F32", "F16", "Q8_0")


class GGUFError(ValueError):
    """A GGUF file this loader cannot use; the message names what and why."""


@dataclasses.dataclass
class GGUFFile:
    """What :func:`read_gguf` found: settings, float32 tensors, the tokenizer's data."""

    path: Path
    config: LlamaConfig
    tensors: dict[str, np.ndarray]  # GGUF name -> float32, row-major (out, in)
    types: dict[str, str]  # GGUF name -> storage type
    metadata: dict[str, Any]  # every other key (tokenizer arrays included)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf(path: str | Path) -> GGUFFile:
    """Reads and dequantizes a Llama-architecture GGUF file.

    Raises:
        GGUFError: not a GGUF file, another architecture, a storage type
            outside :data:`READABLE`, or tensors missing or of the wrong shape.
    """
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e}).") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path}: architecture {arch!r}; this loader reads Llama-architecture models "
            "(general.architecture = 'llama') only."
        )

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise GGUFError(f"{path}: the key llama.{key} is missing.")
        return value

    names = [t.name for t in reader.tensors]
    tokens = _field(reader, "tokenizer.ggml.tokens")
    embd = [t for t in reader.tensors if t.name == "token_embd.weight"]
    vocab = _field(reader, "llama.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and embd:
        vocab = int(embd[0].shape[-1])  # GGUF lists the fastest axis (dim) first
    if vocab is None:
        raise GGUFError(f"{path}: no vocabulary size (llama.vocab_size, tokens or token_embd).")
    config = LlamaConfig(
        vocab_size=int(vocab),
        dim=int(need("embedding_length")),
        hidden_dim=int(need("feed_forward_length")),
        n_layers=int(need("block_count")),
        n_heads=int(need("attention.head_count")),
        n_kv_heads=int(
            _field(reader, "llama.attention.head_count_kv", need("attention.head_count"))
        ),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        context_length=int(_field(reader, "llama.context_length", 2048)),
        tied_embeddings="output.weight" not in names,
    )
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none") or "rope_freqs.weight" in names:
        raise GGUFError(
            f"{path}: the file scales RoPE ({scaling or 'rope_freqs.weight'}, as Llama 3.1+ "
            "do); this decoder applies plain RoPE only, and would compute wrong logits."
        )
    from gguf.quants import dequantize

    tensors, types = {}, {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in READABLE:
            raise GGUFError(
                f"{path}: tensor {t.name} is stored as {kind}; the loader reads "
                f"{', '.join(READABLE)}. Convert the file (llama.cpp's llama-quantize) first."
            )
        tensors[t.name] = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        types[t.name] = kind
    metadata = {
        k: _field(reader, k)
        for k in reader.fields
        if not k.startswith("GGUF.") and not k.startswith("llama.")
    }
    file = GGUFFile(path, config, tensors, types, metadata)
    _check_shapes(file)
    return file


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama GGUF holds, in numpy's row-major order."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (config.vocab_size, config.dim),
        "output_norm.weight": (config.dim,),
    }
    if not config.tied_embeddings:
        shapes["output.weight"] = (config.vocab_size, config.dim)
    for i in range(config.n_layers):
        shapes[f"blk.{i}.attn_norm.weight"] = (config.dim,)
        shapes[f"blk.{i}.ffn_norm.weight"] = (config.dim,)
        for name, (fan_in, fan_out) in config.linear_shapes().items():
            shapes[f"blk.{i}.{name}.weight"] = (fan_out, fan_in)
    return shapes


def _check_shapes(file: GGUFFile) -> None:
    want = expected_shapes(file.config)
    missing = sorted(set(want) - set(file.tensors))
    if missing:
        raise GGUFError(f"{file.path}: tensors missing: {', '.join(missing[:5])}.")
    extra = sorted(set(file.tensors) - set(want))
    if extra:
        raise GGUFError(
            f"{file.path}: tensors this Llama decoder does not use: {', '.join(extra[:5])} "
            "(another variant of the architecture)."
        )
    for name, shape in want.items():
        if tuple(file.tensors[name].shape) != shape:
            raise GGUFError(
                f"{file.path}: {name} has shape {file.tensors[name].shape}, expected {shape} "
                "from the file's llama.* settings."
            )


def to_model(file: GGUFFile) -> Llama:
    """The :class:`Llama` whose parameters are the file's (dequantized) tensors."""
    model = Llama(file.config, nnx.Rngs(0))
    t = file.tensors
    model.token_embd[...] = jnp.asarray(t["token_embd.weight"])
    model.output_norm.weight[...] = jnp.asarray(t["output_norm.weight"])
    if model.output is not None:
        model.output[...] = jnp.asarray(t["output.weight"])
    for i, block in enumerate(model.blk):
        block.attn_norm.weight[...] = jnp.asarray(t[f"blk.{i}.attn_norm.weight"])
        block.ffn_norm.weight[...] = jnp.asarray(t[f"blk.{i}.ffn_norm.weight"])
        for name in LINEARS:
            getattr(block, name).kernel[...] = jnp.asarray(t[f"blk.{i}.{name}.weight"].T)
    return model


def model_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The model's parameters under their GGUF names, row-major ``(out, in)`` (copies)."""
    out = {
        "token_embd.weight": np.array(model.token_embd[...]),
        "output_norm.weight": np.array(model.output_norm.weight[...]),
    }
    if model.output is not None:
        out["output.weight"] = np.array(model.output[...])
    for i, block in enumerate(model.blk):
        out[f"blk.{i}.attn_norm.weight"] = np.array(block.attn_norm.weight[...])
        out[f"blk.{i}.ffn_norm.weight"] = np.array(block.ffn_norm.weight[...])
        for name in LINEARS:
            out[f"blk.{i}.{name}.weight"] = np.array(getattr(block, name).kernel[...]).T
    return out


def load_llama(path: str | Path) -> tuple[Llama, GGUFFile]:
    """:func:`read_gguf` then :func:`to_model`."""
    file = read_gguf(path)
    return to_model(file), file


def write_gguf(
    path: str | Path,
    config: LlamaConfig,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, Any],
    *,
    dtype: str = "F16",
) -> None:
    """Writes a Llama GGUF file that llama.cpp loads.

    The settings come from ``config``, the tokenizer and other keys from
    ``metadata`` (as :func:`read_gguf` returns them); 2-D weights are stored
    as ``dtype`` (F16, F32 or Q8_0: 32 weights share an F16 scale and zeros
    stay exactly zero; a Q8_0 tensor whose rows are not whole 32-blocks is
    written as F16, as llama.cpp's converter does), norms as F32. Tensor
    names are the source's.
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    if dtype not in WRITABLE:
        raise GGUFError(f"GGUF output type {dtype!r}: choose one of {', '.join(WRITABLE)}.")
    path = Path(path)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    file_type = {"F32": 0, "F16": 1, "Q8_0": 7}[dtype]
    writer.add_file_type(file_type)
    for key, value in metadata.items():
        if key in (
            "general.architecture",
            "general.file_type",
            "general.quantization_version",
            "general.alignment",  # the writer pads to its own alignment
        ):
            continue
        _add_value(writer, key, value)
    qtype = getattr(GGMLQuantizationType, dtype)
    for name, array in tensors.items():
        a = np.asarray(array, np.float32)
        if a.ndim == 1 or dtype == "F32":
            writer.add_tensor(name, a)
        elif dtype == "F16" or a.shape[-1] % 32:  # Q8_0 needs rows of whole 32-blocks
            writer.add_tensor(name, a.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_value(writer: Any, key: str, value: Any) -> None:
    """One metadata key in its GGUF type (an empty array is left out: it has no type)."""
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if value < 0:
            writer.add_int32(key, value) if value >= -(2**31) else writer.add_int64(key, value)
        else:
            writer.add_uint32(key, value) if value < 2**32 else writer.add_uint64(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list | tuple) and value:
        first = value[0]
        if isinstance(first, str):
            writer.add_array(key, list(value))
        elif isinstance(first, float):
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        else:
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, GGUFValueType.INT32)


__all__ = [
    "READABLE",
    "WRITABLE",
    "GGUFError",
    "GGUFFile",
    "expected_shapes",
    "load_llama",
    "model_tensors",
    "read_gguf",
    "to_model",
    "write_gguf",
]
