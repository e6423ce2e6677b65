"""A tiny VLA-shaped model for tests: a Llama language backbone plus a DiT-style action head.

No VLA weights exist offline, so this mimics GR00T N1.5's layout: the action head's blocks
alternate cross-attention (action tokens attend to the backbone's features) and
self-attention, with diffusers-style names (to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2).
Its attention calls transformers' AttentionInterface like any HF model, so QuantVLA's capture
sees it without model-specific code.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

HIDDEN = 32  # DiT width
HEADS = 4
N_ACTIONS = 6  # action tokens denoised per observation
ACTION_DIM = 7


def dit_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention for [b, H, s, d] tensors; returns [b, s, H, d] like transformers'."""
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask
    probs = F.softmax(logits.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class DiTAttention(nn.Module):
    is_causal = False  # action tokens attend to everything

    def __init__(self, config, cross_dim: int | None = None):
        super().__init__()
        self.config = config
        self.head_dim = HIDDEN // HEADS
        self.scaling = self.head_dim**-0.5
        kv_in = cross_dim or HIDDEN
        self.to_q = nn.Linear(HIDDEN, HIDDEN)
        self.to_k = nn.Linear(kv_in, HIDDEN)
        self.to_v = nn.Linear(kv_in, HIDDEN)
        self.to_out = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, s, _ = x.shape
        q = self.to_q(x).view(b, s, HEADS, self.head_dim).transpose(1, 2)  # [b, H, s, d]
        k = self.to_k(context).view(b, context.shape[1], HEADS, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], HEADS, self.head_dim).transpose(1, 2)
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, dit_eager_attention)
        out, _ = fn(self, q, k, v, None, scaling=self.scaling, dropout=0.0)
        return self.to_out[1](self.to_out[0](out.reshape(b, s, HIDDEN)))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        # diffusers FeedForward: net = [GELU(proj), Dropout, Linear]
        self.net = nn.ModuleList([nn.Module(), nn.Dropout(0.0), nn.Linear(4 * HIDDEN, HIDDEN)])
        self.net[0].proj = nn.Linear(HIDDEN, 4 * HIDDEN)

    def forward(self, x):
        return self.net[2](self.net[1](F.gelu(self.net[0].proj(x))))


class DiTBlock(nn.Module):
    def __init__(self, config, cross_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        self.attn1 = DiTAttention(config, cross_dim)
        self.norm3 = nn.LayerNorm(HIDDEN)
        self.ff = FeedForward()
        self.cross = cross_dim is not None

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x), context if self.cross else None)
        return x + self.ff(self.norm3(x))


class ActionHead(nn.Module):
    def __init__(self, llm_hidden: int, n_blocks: int = 4):
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation="sdpa")
        self.action_tokens = nn.Parameter(torch.randn(N_ACTIONS, HIDDEN) * 0.5)
        # even blocks cross-attend to the backbone, odd blocks self-attend (GR00T alternation)
        self.blocks = nn.ModuleList(
            [DiTBlock(self.config, llm_hidden if i % 2 == 0 else None) for i in range(n_blocks)]
        )
        self.proj_out = nn.Linear(HIDDEN, ACTION_DIM)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.action_tokens.expand(features.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, features)
        return self.proj_out(x)


class TinyVLA(nn.Module):
    """forward(input_ids [b, s]) -> actions [b, N_ACTIONS, ACTION_DIM]."""

    def __init__(self, attn_implementation: str = "sdpa", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, attn_implementation=attn_implementation,
        )
        self.language_model = LlamaModel(cfg)
        self.action_head = ActionHead(cfg.hidden_size)
        self.action_head.config._attn_implementation = attn_implementation

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        features = self.language_model(input_ids=input_ids, use_cache=False).last_hidden_state
        return self.action_head(features)
