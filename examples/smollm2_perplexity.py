"""Perplexity of SmolLM2-135M (its Q4_1 GGUF, dequantized) on the start of a WikiText file.

    .venv/bin/python examples/smollm2_perplexity.py ../shared/data/wikitext-2-raw/wiki.test.raw

Prints the perplexity over the first 3 windows of 512 tokens (1,533 predicted
tokens) of the file as it is -- the setting of the llama.cpp figure, 28.9 --
and over the same windows of SparseGPT's joining of its lines.
"""

import sys

from admmprune.llm.fetch import smollm2_path
from admmprune.llm.gguf_io import load_llama
from admmprune.llm.llama import forward_fn
from admmprune.llm.text import encode, eval_windows, perplexity, read_text
from admmprune.llm.tokenizer import gguf_tokenizer

path = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/wikitext-2-raw/wiki.test.raw"
model, file = load_llama(smollm2_path())  # fetched once, hash-checked
tokenizer = gguf_tokenizer(file)
params, apply = forward_fn(model)

with open(path, encoding="utf-8") as f:
    raw = f.read()
for name, text in (("file as it is", raw), ("lines joined by blank lines", read_text(path))):
    windows = eval_windows(encode(tokenizer, text), 512, max_tokens=3 * 512)
    r = perplexity(lambda tokens: apply(params, tokens), windows, batch=1)
    print(f"{name}: perplexity {r['perplexity']:.2f} over {r['tokens']} tokens")
