import pytest
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from quantkit.arch import arch_info
from quantkit.errors import UnsupportedArchitectureError
from quantkit.targets import Targets, is_linear
from tests.tiny_models import MOE_ARCHS, ORIGINAL_ARCHS, TINY_CONFIGS, tiny_config, tiny_model

_LLAMA = ("model.layers",
          {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
          (("q", "k", "v"), ("gate", "up")), "self_attn")

# the hand table discovery replaced (quantkit/arch.py before issue 14): layers path, roles, fused, attention
OLD_TABLE = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma": _LLAMA,
    "phi3": ("model.layers",
             {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
             (), "self_attn"),
    "gpt2": ("transformer.h", {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
             (), "attn"),
    "opt": ("model.decoder.layers",
            {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
             "up": "fc1", "down": "fc2"},
            (("q", "k", "v"),), "self_attn"),
}

# what the new tiny architectures must be understood as (checked against each modeling file)
NEW_EXPECTED = {
    "gpt_neox": ("gpt_neox.layers",
                 {"qkv": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                  "down": "mlp.dense_4h_to_h"}, (), "attention"),
    "falcon": ("transformer.h",
               {"qkv": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
                "down": "mlp.dense_4h_to_h"}, (), "self_attention"),
    "stablelm": _LLAMA,
    "olmo2": _LLAMA,
    "granite": _LLAMA,
    # parallel block: fc1 reads the same tensor as q/k/v but is MLP, so it is not in their group
    "phi": ("model.layers",
            {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.dense",
             "up": "mlp.fc1", "down": "mlp.fc2"}, (("q", "k", "v"),), "self_attn"),
    "mixtral": ("model.layers",
                {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
                (("q", "k", "v"),), "self_attn"),
    "qwen2_moe": ("model.layers",
                  {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                   "shared_gate": "mlp.shared_expert.gate_proj", "shared_up": "mlp.shared_expert.up_proj",
                   "shared_down": "mlp.shared_expert.down_proj"},
                  (("q", "k", "v"), ("shared_gate", "shared_up")), "self_attn"),
}
EXPECTED = {**OLD_TABLE, **NEW_EXPECTED}


def _facts(info):
    return info.layers_path, info.roles, info.fused, info.attn_path


def test_every_tiny_arch_has_an_expectation():
    assert set(EXPECTED) == set(TINY_CONFIGS)


@pytest.mark.parametrize("arch", ORIGINAL_ARCHS)
def test_discovery_matches_the_old_table(arch):
    info = arch_info(tiny_model(arch))
    assert _facts(info) == OLD_TABLE[arch]
    assert list(info.roles) == list(OLD_TABLE[arch][1])  # same order: sensitivity lists components by it


@pytest.mark.parametrize("arch", sorted(NEW_EXPECTED))
def test_discovery_understands_new_architectures(arch):
    assert _facts(arch_info(tiny_model(arch))) == NEW_EXPECTED[arch]


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_discovery_on_a_meta_skeleton_equals_the_materialized_model(arch):
    """The streaming skeleton: decoder blocks on meta, at most the embeddings materialized."""
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.bfloat16)
    assert all(p.is_meta for p in skeleton.parameters())
    real = arch_info(tiny_model(arch))
    info = arch_info(skeleton)
    assert (_facts(info), info.blocks) == (_facts(real), real.blocks)
    assert all(p.is_meta for p in skeleton.parameters())  # nothing was materialized in place


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_role_resolves_to_a_linear(arch):
    model = tiny_model(arch)
    info = arch_info(model)
    for layer in range(info.num_layers):
        for role in info.roles:
            module = model.get_submodule(info.module_name(layer, role))
            assert is_linear(module), (arch, role, type(module))


# block linears per layer a default Targets selects: routers and fused experts are not Linears in it
EXPECTED_PER_LAYER = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma": 7, "phi3": 4, "gpt2": 4, "opt": 6,
                      "gpt_neox": 4, "falcon": 4, "stablelm": 7, "olmo2": 7, "granite": 7, "phi": 6,
                      "mixtral": 4, "qwen2_moe": 7}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_default_targets_are_block_linears_only(arch):
    model = tiny_model(arch)
    info = arch_info(model)
    names = Targets().select(model, info)
    assert len(names) == EXPECTED_PER_LAYER[arch] * info.num_layers
    assert not any("lm_head" in n or "embed" in n or "gate" == n.rsplit(".", 1)[-1] for n in names)
    assert not any(n in info.routers(layer) for layer in range(info.num_layers) for n in names)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_experts_and_routers_are_found(arch):
    model = tiny_model(arch)
    info = arch_info(model)
    assert info.is_moe
    for layer in range(info.num_layers):
        ((name, experts),) = info.experts(layer)
        assert name == f"model.layers.{layer}.mlp.experts"
        assert experts.num_experts == 4 and experts.params == {"gate_up": "gate_up_proj", "down": "down_proj"}
        assert not experts.transposed
    expected_routers = {"mixtral": ["mlp.gate"], "qwen2_moe": ["mlp.gate", "mlp.shared_expert_gate"]}[arch]
    assert info.routers(0) == [f"model.layers.0.{r}" for r in expected_routers]
    assert info.role_of("model.layers.0.mlp.shared_expert_gate") is None


def test_kinds_of_linears(tiny_llama):
    kinds = {role: kind for _, role, kind in arch_info(tiny_llama).linears(0)}
    assert kinds == {"q": "attention", "k": "attention", "v": "attention", "o": "attention",
                     "gate": "mlp", "up": "mlp", "down": "mlp"}


def test_targets_roles_and_layers_filter(tiny_llama):
    info = arch_info(tiny_llama)
    names = Targets(roles=["q", "o"], layers=[1]).select(tiny_llama, info)
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]


def test_lm_head_selected_only_when_included_explicitly(tiny_llama):
    info = arch_info(tiny_llama)
    assert "lm_head" in Targets(include=["lm_head"]).select(tiny_llama, info)
    assert "lm_head" not in Targets(exclude=["*q_proj"]).select(tiny_llama, info)


@pytest.mark.parametrize(("arch", "heads"), [("llama", (4, 2, 16)), ("gpt2", (4, 4, 16)), ("falcon", (4, 1, 16)),
                                             ("phi3", (4, 2, 16)), ("gpt_neox", (4, 4, 16))])
def test_head_counts_from_the_traced_attention(arch, heads):
    info = arch_info(tiny_model(arch))
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == heads
    assert info.hidden_size == 64


def test_quantized_linears_keep_the_structure(tiny_llama):
    from quantkit.nn.qlinear import quantize_linear
    from quantkit.targets import set_module

    before = arch_info(tiny_llama)
    for name in Targets().select(tiny_llama, before):
        set_module(tiny_llama, name, quantize_linear(tiny_llama.get_submodule(name), "int8", mode="fake"))
    assert _facts(arch_info(tiny_llama)) == _facts(before)


class _NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = tiny_config("llama")
        self.proj = nn.Linear(4, 4)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _MlpOnly(nn.Module):
    """A 'decoder' with no attention at all."""

    _no_split_modules = ["_Block"]

    def __init__(self):
        super().__init__()
        self.config = tiny_config("llama")
        self.config.hidden_size = 8
        self.embed = nn.Embedding(256, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids, **_):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return x


def test_model_without_blocks_names_the_missing_fact():
    with pytest.raises(UnsupportedArchitectureError, match="cannot find the decoder blocks of _NoBlocks: no _no_split"):
        arch_info(_NoBlocks())


def test_block_without_attention_names_the_missing_fact():
    with pytest.raises(UnsupportedArchitectureError, match="no attention found in _Block"):
        arch_info(_MlpOnly())


def test_role_overrides_rename_a_linear(monkeypatch, tiny_llama):
    from quantkit import arch as arch_mod

    monkeypatch.setitem(arch_mod.ROLE_OVERRIDES, "llama", {"mlp.up_proj": "up2"})
    info = arch_mod._discover(tiny_llama)
    assert info.roles["up2"] == "mlp.up_proj" and "up" not in info.roles
    assert info.fused == (("q", "k", "v"), ("gate", "up2"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", *MOE_ARCHS])
def test_skeleton_blocks_trace_with_zero_memory_stand_ins(arch, monkeypatch):
    """Large skeleton tensors become stride-0 zeros (no weight memory); the structure is unchanged
    and the model's own config keeps its experts implementation."""
    import functools

    import quantkit.structure as structure
    from quantkit.structure.trace import materialized

    monkeypatch.setattr(structure, "materialized", functools.partial(materialized, large=0))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.bfloat16)
    implementation = getattr(skeleton.config, "_experts_implementation", None)
    assert arch_info(skeleton).blocks == arch_info(tiny_model(arch)).blocks
    assert getattr(skeleton.config, "_experts_implementation", None) == implementation
