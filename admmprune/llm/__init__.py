"""Pretrained language models: a GGUF Llama loader, its tokenizer, text and perplexity.

Nothing in the core library imports this subpackage; it needs the ``llm``
extra (``gguf``, ``tokenizers``).
"""
