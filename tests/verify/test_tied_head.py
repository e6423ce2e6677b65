"""A tied model whose recipe includes lm_head: the head is quantized, the embeddings stay full
precision, the saved config says tie_word_embeddings false and the checkpoint holds both tensors
(issue 12, section 2.6). Whole and streaming agree byte for byte, transformers reloads the
checkpoint with the in-memory model's logits, and verify passes on it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from quantkit.api import apply, save_output
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.passes.quantize import Quantize
from quantkit.recipe import load_recipe
from quantkit.targets import Targets
from quantkit.verify import verify_checkpoint

SMALL = ["calib.n_samples=2", "calib.seq_len=32", "calib.batch_size=2", "eval.enabled=false"]
HEAD = '.targets.include=["*_proj","lm_head"]'  # the quantize pass's targets, head included


def _tied_llama(vocab_size: int, dtype=torch.float32):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, smollm2_tokenizer):
    path = tmp_path_factory.mktemp("tied-llama")
    _tied_llama(len(smollm2_tokenizer), torch.bfloat16).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _keys(path) -> set[str]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize(("recipe_name", "index"), [("int8-w8a16", 0), ("nvfp4-w4a16", 1)])
def test_tied_head_included_is_untied_the_same_in_whole_and_streaming(recipe_name, index, tied_dir, tmp_path):
    recipe = load_recipe(recipe_name, overrides=SMALL + [f"passes.{index}{HEAD}"])
    assert recipe.passes[index].name == "quantize"
    outs = {}
    for mode in ("whole", "streaming"):
        outs[mode] = tmp_path / mode
        apply(recipe, str(tied_dir), output=outs[mode], execution=mode)
    whole, streaming = outs["whole"], outs["streaming"]
    assert (whole / "model.safetensors").read_bytes() == (streaming / "model.safetensors").read_bytes()
    assert (whole / "config.json").read_text() == (streaming / "config.json").read_text()
    config = json.loads((whole / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    keys = _keys(whole)
    assert "model.embed_tokens.weight" in keys and "lm_head.weight_packed" in keys and "lm_head.weight" not in keys
    assert "lm_head" not in config["quantization_config"]["ignore"]
    result = verify_checkpoint(whole, allow_quantized_lm_head=True)
    assert result.ok, result.to_dict()["errors"]


def test_untied_checkpoint_reloads_with_the_in_memory_logits(tmp_path):
    """fp32 fake quant: transformers + compressed-tensors decompress the same codes the in-memory
    QLinear holds, so the logits are bitwise equal; the embeddings keep their full-precision values."""
    model = _tied_llama(256)
    embed = model.model.embed_tokens.weight.detach().clone()
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Quantize(format="int8", mode="fake", targets=Targets(include=["*_proj", "lm_head"])).run(model, ctx)
    assert model.config.tie_word_embeddings is False
    assert ctx.report["quantize"]["untied_word_embeddings"] is True
    assert torch.equal(model.model.embed_tokens.weight, embed)  # the input embeddings are not quantized

    class _Tok:
        def save_pretrained(self, path):
            pass

    out = tmp_path / "ckpt"
    out.mkdir()
    save_output(model, _Tok(), out)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings is False
    assert torch.equal(loaded.model.embed_tokens.weight, embed)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert verify_checkpoint(out, allow_quantized_lm_head=True).ok


def test_a_tied_model_without_the_head_stays_tied(tied_dir, tmp_path):
    apply(load_recipe("int8-w8a16", overrides=SMALL), str(tied_dir), output=tmp_path / "o", execution="streaming")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["tie_word_embeddings"] is True
    assert not any(k.startswith("lm_head") for k in _keys(tmp_path / "o"))
