"""Per-architecture facts, discovered from the model (quantkit/structure/), not from a table.

`arch_info(model)` finds the decoder blocks from `_no_split_modules`, traces one block per
distinct block structure, and names each linear's role from the dataflow (docs/architectures.md).
Works on a streaming skeleton whose blocks live on the meta device. A small override table can
rename a role for an odd model; it is no longer the gate.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

from torch import nn

from quantkit.errors import UnsupportedArchitectureError
from quantkit.structure import ROLE_ORDER, BlockStructure, ExpertsInfo, LinearInfo, discover

ATTN_ROLES = ("q", "k", "v", "o", "qkv")
MLP_ROLES = ("gate", "up", "down", "gate_up")

# model_type -> {path inside a block: role}: renames discovery's role for a linear, for the odd
# model whose dataflow misleads it. Empty: every tested architecture is understood as is.
ROLE_OVERRIDES: dict[str, dict[str, str]] = {}


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    layers_path: str
    roles: dict[str, str]  # role -> path inside a block (the first block that has the role)
    fused: tuple[tuple[str, ...], ...]
    attn_path: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    blocks: tuple[BlockStructure, ...] = field(default=(), repr=False)  # one per layer

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def _roles_at(self, layer: int) -> dict[str, str]:
        return self.blocks[layer].roles if self.blocks else self.roles

    def module_name(self, layer: int, role: str) -> str:
        roles = self._roles_at(layer)
        if role not in roles:
            raise KeyError(f"layer {layer} of {self.model_type} has no {role!r} linear; it has {', '.join(roles)}")
        return f"{self.layers_path}.{layer}.{roles[role]}"

    def role_of(self, name: str) -> tuple[int, str] | None:
        """(layer index, role) for a linear's full name, or None if it is not a block linear
        (routers included: they stay out of every role so default targets skip them)."""
        prefix = self.layers_path + "."
        if not name.startswith(prefix):
            return None
        idx, _, rest = name[len(prefix) :].partition(".")
        if not idx.isdigit() or int(idx) >= self.num_layers:
            return None
        for role, path in self._roles_at(int(idx)).items():
            if rest == path:
                return int(idx), role
        return None

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        block = self.layers(model)[layer]
        path = self.blocks[layer].attn_path if self.blocks else self.attn_path
        return block.get_submodule(path) if path else block

    def fused_groups(self, layer: int) -> list[list[str]]:
        groups = self.blocks[layer].fused if self.blocks else self.fused
        return [[self.module_name(layer, r) for r in group] for group in groups]

    # --- what discovery adds -------------------------------------------------------------
    def linears(self, layer: int) -> list[tuple[str, str, str]]:
        """(full name, role, kind) of every linear in a block; kind: attention, mlp or other."""
        base = f"{self.layers_path}.{layer}."
        return [(base + li.path, li.role, li.kind) for li in self.blocks[layer].linears]

    def experts(self, layer: int) -> list[tuple[str, ExpertsInfo]]:
        """(full module name, layout) of each fused-experts module in a block."""
        base = f"{self.layers_path}.{layer}."
        return [(base + e.path, e) for e in self.blocks[layer].experts]

    def routers(self, layer: int) -> list[str]:
        base = f"{self.layers_path}.{layer}."
        return [base + r for r in self.blocks[layer].routers]

    @property
    def is_moe(self) -> bool:
        return any(b.experts for b in self.blocks)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _config_int(config, names: tuple[str, ...], fact: str, model_type: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedArchitectureError(
        f"cannot understand {model_type!r}: its config has no {fact} (looked for {', '.join(names)})")


def _apply_overrides(block: BlockStructure, overrides: dict[str, str]) -> BlockStructure:
    if not overrides:
        return block
    linears = tuple(replace(li, role=overrides.get(li.path, li.role)) for li in block.linears)
    renamed = {li.role: o.role for li, o in zip(block.linears, linears)}
    fused = tuple(tuple(renamed[r] for r in g) for g in block.fused)
    return replace(block, linears=linears, fused=fused)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, ArchInfo]]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    # module paths only: swapping a Linear for a QLinear keeps the structure and the cache
    return tuple(name for name, _ in model.named_modules())


def arch_info(model: nn.Module) -> ArchInfo:
    key = _fingerprint(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    info = _discover(model)
    _CACHE[model] = (key, info)
    return info


def _discover(model: nn.Module) -> ArchInfo:
    config = _text_config(model.config)
    model_type = str(getattr(config, "model_type", type(model).__name__)).removesuffix("_text")
    hidden = _config_int(config, ("hidden_size", "n_embd", "d_model"), "hidden size", model_type)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(emb, "num_embeddings", None)
    if not isinstance(vocab, int):
        raise UnsupportedArchitectureError(f"cannot understand {model_type!r}: no vocab_size in its config")
    layers_path, blocks = discover(model, hidden, vocab)
    blocks = [_apply_overrides(b, ROLE_OVERRIDES.get(model_type, {})) for b in blocks]

    roles: dict[str, str] = {}
    fused: list[tuple[str, ...]] = []
    for b in blocks:
        for li in b.linears:
            roles.setdefault(li.role, li.path)
        fused += [g for g in b.fused if g not in fused]
    order = {r: i for i, r in enumerate(ROLE_ORDER)}
    roles = dict(sorted(roles.items(), key=lambda kv: order.get(kv[0], len(order))))

    heads = next((b.heads for b in blocks if b.heads), None)
    if heads is None:  # the trace did not show [B, H, T, d] queries: ask the config
        n_heads = _config_int(config, ("num_attention_heads", "n_head", "num_heads"), "attention head count", model_type)
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or hidden // n_heads
        heads = (n_heads, n_kv, head_dim)
    return ArchInfo(
        model_type=model_type,
        layers_path=layers_path,
        roles=roles,
        fused=tuple(fused),
        attn_path=blocks[0].attn_path,
        num_layers=len(blocks),
        hidden_size=hidden,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=heads[2],
        vocab_size=vocab,
        blocks=tuple(blocks),
    )


__all__ = ["ATTN_ROLES", "MLP_ROLES", "ROLE_OVERRIDES", "ArchInfo", "ExpertsInfo", "LinearInfo", "arch_info"]
