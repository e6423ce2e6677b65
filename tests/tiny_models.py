"""Tiny random models for architecture coverage; no downloads."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    PhiConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    StableLmConfig,
)

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)

# the seven architectures of the original hand table
ORIGINAL_ARCHS = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "opt")
# fused 3-D experts in transformers 5: mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]
MOE_ARCHS = ("mixtral", "qwen2_moe")

TINY_CONFIGS = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **_COMMON),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **_COMMON),
    "mistral": lambda v: MistralConfig(vocab_size=v, **_COMMON),
    "gemma": lambda v: GemmaConfig(vocab_size=v, head_dim=16, **_COMMON),
    "phi3": lambda v: Phi3Config(vocab_size=v, pad_token_id=0, **_COMMON),
    "gpt2": lambda v: GPT2Config(vocab_size=v, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda v: OPTConfig(vocab_size=v, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
    # packed query_key_value, parallel residual (attention and MLP read different norms)
    "gpt_neox": lambda v: GPTNeoXConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=256),
    # multi-query packed qkv; parallel attention and MLP read the same normed input
    "falcon": lambda v: FalconConfig(vocab_size=v, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     multi_query=True, parallel_attn=True, bias=False, alibi=False),
    "stablelm": lambda v: StableLmConfig(vocab_size=v, **_COMMON),
    "olmo2": lambda v: Olmo2Config(vocab_size=v, **_COMMON),
    "granite": lambda v: GraniteConfig(vocab_size=v, **_COMMON),
    # phi-1/2: parallel attention and MLP on one LayerNorm output, dense output projection
    "phi": lambda v: PhiConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256),
    "mixtral": lambda v: MixtralConfig(vocab_size=v, num_local_experts=4, num_experts_per_tok=2, **_COMMON),
    "qwen2_moe": lambda v: Qwen2MoeConfig(vocab_size=v, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256),
}


def tiny_config(arch: str, vocab_size: int = 256):
    return TINY_CONFIGS[arch](vocab_size)


def tiny_model(arch: str, vocab_size: int = 256, dtype: torch.dtype = torch.float32):
    config = tiny_config(arch, vocab_size)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
