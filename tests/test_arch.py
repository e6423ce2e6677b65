import pytest
import torch
from transformers import BertConfig, BertModel

from quantkit.arch import SUPPORTED, arch_info
from quantkit.errors import UnsupportedArchitectureError
from quantkit.targets import Targets, is_linear
from tests.tiny_models import TINY_CONFIGS, tiny_model

# block linears per layer in each family's table
EXPECTED_PER_LAYER = {"llama": 7, "qwen2": 7, "mistral": 7, "gemma": 7, "phi3": 4, "gpt2": 4, "opt": 6}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_role_resolves_to_a_linear(arch):
    model = tiny_model(arch)
    info = arch_info(model)
    for layer in range(info.num_layers):
        for role in info.roles:
            module = model.get_submodule(info.module_name(layer, role))
            assert is_linear(module), (arch, role, type(module))


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_default_targets_are_block_linears_only(arch):
    model = tiny_model(arch)
    info = arch_info(model)
    names = Targets().select(model, info)
    assert len(names) == EXPECTED_PER_LAYER[arch] * info.num_layers
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_targets_roles_and_layers_filter(tiny_llama):
    info = arch_info(tiny_llama)
    names = Targets(roles=["q", "o"], layers=[1]).select(tiny_llama, info)
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]


def test_lm_head_selected_only_when_included_explicitly(tiny_llama):
    info = arch_info(tiny_llama)
    assert "lm_head" in Targets(include=["lm_head"]).select(tiny_llama, info)
    assert "lm_head" not in Targets(exclude=["*q_proj"]).select(tiny_llama, info)


def test_unsupported_architecture_lists_supported():
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="supported: " + ", ".join(SUPPORTED)):
        arch_info(model)


def test_head_counts_follow_config(tiny_llama):
    info = arch_info(tiny_llama)
    assert (info.num_heads, info.num_kv_heads, info.head_dim, info.hidden_size) == (4, 2, 16, 64)
    assert torch.is_tensor(tiny_llama.get_submodule(info.module_name(0, "k")).weight)
