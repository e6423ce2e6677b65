"""Tiny random models for architecture coverage; no downloads."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
)

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)

TINY_CONFIGS = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **_COMMON),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **_COMMON),
    "mistral": lambda v: MistralConfig(vocab_size=v, **_COMMON),
    "gemma": lambda v: GemmaConfig(vocab_size=v, head_dim=16, **_COMMON),
    "phi3": lambda v: Phi3Config(vocab_size=v, pad_token_id=0, **_COMMON),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda v: OPTConfig(vocab_size=v, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
}


def tiny_model(arch: str, vocab_size: int = 256, dtype: torch.dtype = torch.float32):
    config = TINY_CONFIGS[arch](vocab_size)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
