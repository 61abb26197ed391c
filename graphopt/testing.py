"""Tiny randomly initialised Hugging Face LMs built from config (no downloads), for tests and benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_hf_lm(kind: str, path: Path, vocab: int = 128, hidden: int = 32, layers: int = 2,
               max_positions: int = 256, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny GPT-2 or Llama (grouped-query attention: 4 heads, 2 KV heads) to `path` with weights of `dtype`;
    returns `path`."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=hidden,
                                           n_layer=layers, n_head=4))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=max_positions))
    else:
        raise ValueError(f"kind '{kind}': choose gpt2 or llama")
    model.eval().to(dtype).save_pretrained(path, safe_serialization=True)
    return path
