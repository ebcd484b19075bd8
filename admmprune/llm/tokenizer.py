"""The BPE tokenizer a GGUF file carries, rebuilt with Hugging Face ``tokenizers``.

A ``tokenizer.ggml.model = "gpt2"`` file stores the byte-level BPE: its
vocabulary (``tokenizer.ggml.tokens``, strings in GPT-2's byte-to-unicode
alphabet), its merges in priority order (``tokenizer.ggml.merges``, "a b"),
token types (3 = control, e.g. ``<|im_start|>``) and the name of its
pre-tokenizer (``tokenizer.ggml.pre``), which says how text is split before
BPE. The splits follow llama.cpp's regexes for each name: ``smollm``
(SmolLM, StarCoder) first isolates every digit, then applies GPT-2's pattern
``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)``;
``gpt2`` applies GPT-2's pattern alone; ``llama-bpe`` (Llama 3) its own.
"""

from __future__ import annotations

from typing import Any

from admmprune.llm.gguf_io import GGUFError, GGUFFile

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: the pre-tokenizers (``tokenizer.ggml.pre``) rebuilt here.
PRE_TOKENIZERS = ("smollm", "gpt2", "starcoder", "llama-bpe", "llama3")


def _pre_tokenizer(name: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("smollm", "starcoder"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name == "gpt2":
        return byte_level
    if name in ("llama-bpe", "llama3"):
        split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    raise GGUFError(
        f"tokenizer.ggml.pre = {name!r}: the pre-tokenizers rebuilt here are "
        f"{', '.join(PRE_TOKENIZERS)}."
    )


def gguf_tokenizer(file: GGUFFile) -> Any:
    """A ``tokenizers.Tokenizer`` equal to the file's byte-level BPE.

    Control tokens (type 3) are special: matched whole in the text, never
    split. No BOS token is added, whatever ``tokenizer.ggml.add_bos_token``
    says (SmolLM2's files say False); callers that want one prepend it.

    Raises:
        GGUFError: a tokenizer model other than ``gpt2`` (byte-level BPE),
            or a pre-tokenizer outside :data:`PRE_TOKENIZERS`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models

    meta = file.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"{file.path}: tokenizer.ggml.model = {kind!r}; only byte-level BPE ('gpt2') "
            "tokenizers are rebuilt here."
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = str(meta.get("tokenizer.ggml.pre", "(missing)"))
    # Llama 3's BPE takes a word that is in the vocabulary whole (llama.cpp and
    # its tokenizer.json: ignore_merges).
    llama3 = pre in ("llama-bpe", "llama3")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=llama3))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [tokens[i] for i, t in enumerate(types) if int(t) == 3]
    if special:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return tok


__all__ = ["PRE_TOKENIZERS", "gguf_tokenizer"]
