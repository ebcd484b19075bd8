"""Text for language-model pruning: WikiText-style evaluation, calibration windows, perplexity.

Evaluation follows SparseGPT and Wanda: the lines of ``wiki.test.raw``
(blank lines as empty rows, as the Hugging Face dataset holds them) joined
with ``"\\n\\n"``, tokenized once, and cut into non-overlapping windows of
``context`` tokens; each window predicts its ``context - 1`` next tokens
and the perplexity is ``exp`` of their mean negative log-likelihood.
Calibration windows are drawn from another text (``wiki.valid.raw``) at
seeded random offsets.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from admmprune.guards import DivergenceError


class TextError(ValueError):
    """Text that cannot give what was asked (too short, missing); says what to change."""


def read_text(path: str | Path) -> str:
    """The lines of a WikiText-style file joined with blank lines (SparseGPT's joining)."""
    path = Path(path)
    if not path.is_file():
        raise TextError(f"{path}: no such text file; pass one with --eval-text/--calib-text.")
    # Lines end at "\n" only (str.splitlines would also split at \x0b, \x85, ...).
    lines = re.findall(r"[^\n]*\n|[^\n]+$", path.read_text(encoding="utf-8"))
    return "\n\n".join(line if line.strip() else "" for line in lines)


def encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of ``text`` (int32), no special tokens added."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def eval_windows(tokens: np.ndarray, context: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping ``(n, context)`` windows over the first ``max_tokens`` tokens."""
    limit = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    n = limit // context
    if n == 0:
        raise TextError(
            f"the text has {len(tokens)} tokens (using {limit}): fewer than one window of "
            f"{context}; use a longer text or a shorter context."
        )
    return tokens[: n * context].reshape(n, context)


def calibration_windows(tokens: np.ndarray, count: int, context: int, seed: int) -> np.ndarray:
    """``count`` windows of ``context`` tokens at seeded uniform random offsets."""
    if len(tokens) < context + 1:
        raise TextError(
            f"the calibration text has {len(tokens)} tokens, fewer than one window of "
            f"{context} + 1; use a longer text or a shorter context."
        )
    starts = np.random.default_rng(seed).integers(0, len(tokens) - context, size=count)
    return np.stack([tokens[s : s + context] for s in starts])


def window_nll(logits: jax.Array, windows: jax.Array) -> jax.Array:
    """Summed next-token negative log-likelihood of each window (float32)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = windows[:, 1:]
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked, axis=-1)


def perplexity(
    logits_fn: Callable[[jax.Array], jax.Array], windows: np.ndarray, batch: int = 4
) -> dict[str, float]:
    """``exp(mean NLL)`` over every predicted token of ``windows``.

    ``logits_fn(tokens) -> logits`` for a ``(b, context)`` batch. The sums are
    accumulated in float64 on the host.
    """
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = jnp.asarray(windows[i : i + batch])
        nll = np.asarray(window_nll(logits_fn(w), w), np.float64)
        if not np.all(np.isfinite(nll)):
            raise DivergenceError(f"non-finite log-likelihood in windows {i}-{i + len(w)}")
        total += float(nll.sum())
        count += int(w.shape[0] * (w.shape[1] - 1))
    return {"perplexity": float(np.exp(total / count)), "tokens": count, "nll": total / count}


__all__ = [
    "TextError",
    "calibration_windows",
    "encode",
    "eval_windows",
    "perplexity",
    "read_text",
    "window_nll",
]
