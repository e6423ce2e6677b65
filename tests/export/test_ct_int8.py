"""INT8 checkpoints in the compressed-tensors layout load in plain transformers and match quantkit."""

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit.api import save_output
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.passes.quantize import Quantize
from tests.tiny_models import tiny_model


def quantized_tiny(act_format="int8", seed=0):
    torch.manual_seed(seed)
    model = tiny_model("llama")
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Quantize(format="int8", act_format=act_format, mode="real").run(model, ctx)
    return model


class _Tok:
    def save_pretrained(self, path):
        pass


def save(model, path):
    path.mkdir()
    save_output(model, _Tok(), path)
    return path


@pytest.mark.parametrize("act_format", ["int8", None])
def test_transformers_loads_and_logprobs_match(tmp_path, act_format):
    model = quantized_tiny(act_format)
    out = save(model, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.inference_mode():
        ours = torch.log_softmax(model(ids).logits.float(), -1)
        theirs = torch.log_softmax(loaded(ids).logits.float(), -1)
    assert (ours - theirs).abs().max().item() < 1e-3


def test_w8a8_config_is_int_quantized_with_lm_head_ignored(tmp_path):
    import json

    out = save(quantized_tiny(), tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True
    assert qc["ignore"] == ["lm_head"]


def test_two_runs_write_byte_identical_safetensors(tmp_path):
    digests = []
    for i in range(2):
        out = save(quantized_tiny(seed=0), tmp_path / f"run{i}")
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Quantize(format="int8", act_format="int8").run(model, ctx)
    out = save(model, tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_per_row_output_scale_is_folded_into_the_checkpoint(tmp_path):
    model = quantized_tiny("int8")
    q = model.model.layers[0].self_attn.q_proj
    q.set_output_scale(torch.linspace(0.8, 1.25, q.out_features))
    out = save(model, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 16))
    with torch.inference_mode():
        a = torch.log_softmax(model(ids).logits, -1)
        b = torch.log_softmax(loaded(ids).logits, -1)
    assert (a - b).abs().max().item() < 1e-3
