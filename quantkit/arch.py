"""Per-architecture facts: where the decoder layers are and what each linear does.

No tracing: each supported family is one table row. Head counts and sizes come from
optimum's NormalizedConfigManager where it knows the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.errors import UnsupportedArchitectureError

# role -> module path inside one decoder layer
_LLAMA_ROLES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_LLAMA = ("model.layers", _LLAMA_ROLES, (("q", "k", "v"), ("gate", "up")), "self_attn")

_TABLE: dict[str, tuple[str, dict[str, str], tuple[tuple[str, ...], ...], str]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "smollm3": _LLAMA,
    "phi3": (
        "model.layers",
        {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
        (),
        "self_attn",
    ),
    "gpt2": (
        "transformer.h",
        {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        (),
        "attn",
    ),
    "opt": (
        "model.decoder.layers",
        {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.out_proj",
            "up": "fc1",
            "down": "fc2",
        },
        (("q", "k", "v"),),
        "self_attn",
    ),
}

SUPPORTED = tuple(sorted(_TABLE))
ATTN_ROLES = ("q", "k", "v", "o", "qkv")
MLP_ROLES = ("gate", "up", "down", "gate_up")


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    layers_path: str
    roles: dict[str, str]
    fused: tuple[tuple[str, ...], ...]
    attn_path: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def module_name(self, layer: int, role: str) -> str:
        return f"{self.layers_path}.{layer}.{self.roles[role]}"

    def role_of(self, name: str) -> tuple[int, str] | None:
        """(layer index, role) for a linear's full name, or None if it is not a block linear."""
        prefix = self.layers_path + "."
        if not name.startswith(prefix):
            return None
        idx, _, rest = name[len(prefix) :].partition(".")
        for role, path in self.roles.items():
            if rest == path:
                return int(idx), role
        return None

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return self.layers(model)[layer].get_submodule(self.attn_path)

    def fused_groups(self, layer: int) -> list[list[str]]:
        return [[self.module_name(layer, r) for r in group] for group in self.fused]


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def arch_info(model: nn.Module) -> ArchInfo:
    config = _text_config(model.config)
    model_type = config.model_type.removesuffix("_text")
    if model_type not in _TABLE:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {config.model_type!r}; supported: {', '.join(SUPPORTED)}"
        )
    layers_path, roles, fused, attn_path = _TABLE[model_type]
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    return ArchInfo(
        model_type=model_type,
        layers_path=layers_path,
        roles=dict(roles),
        fused=fused,
        attn_path=attn_path,
        num_layers=n_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
    )
