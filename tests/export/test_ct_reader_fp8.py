"""quantkit's runtime reads FP8 compressed-tensors checkpoints back (FP8_DYNAMIC and FP8_BLOCK)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.api import apply
from quantkit.export.ct_reader import act_format, weight_format
from quantkit.recipe import load_recipe
from quantkit.verify import verify_checkpoint


@pytest.fixture(scope="module")
def llama_256(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama whose features are multiples of 128, as FP8_BLOCK's tiles need."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("llama-256")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_fp8_args_map_to_quantkit_formats():
    assert weight_format({"num_bits": 8, "type": "float", "strategy": "channel"}) == "fp8"
    assert weight_format({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]}) == "fp8_block"
    assert act_format({"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}) == "fp8"
    assert act_format({"num_bits": 8, "type": "float", "strategy": "group", "group_size": 128,
                       "dynamic": True}) == "fp8_block"


@pytest.mark.parametrize("recipe_name", ["fp8-dynamic", "fp8-block"])
def test_quantkit_runtime_runs_fp8_checkpoints_like_transformers(recipe_name, llama_256, tmp_path):
    recipe = load_recipe(recipe_name, overrides=["calib.n_samples=2", "calib.seq_len=32", "eval.enabled=false"])
    apply(recipe, str(llama_256), output=tmp_path / "q")
    r = verify_checkpoint(tmp_path / "q")
    assert r.errors == [] and r.warnings == []  # before: "not compared with quantkit's runtime" (no FP8 reader)
    run = r.info["run"]
    assert run["runtime_rel_max_diff"] <= run["runtime_tolerance"]["rel_max_diff"]
    assert run["runtime_top1_agreement"] == 1.0
