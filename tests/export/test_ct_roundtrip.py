"""Every compressed-tensors scheme quantkit writes loads in plain transformers with equal outputs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit.api import save_output
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.passes.quantize import Quantize
from tests.tiny_models import tiny_model

SCHEMES = [  # (weight format, activation format, expected CT format)
    ("nvfp4", None, "nvfp4-pack-quantized"),
    ("nvfp4", "nvfp4", "nvfp4-pack-quantized"),
    ("mxfp4", None, "mxfp4-pack-quantized"),
    ("mxfp4", "mxfp4", "mxfp4-pack-quantized"),
    ("int4", None, "pack-quantized"),
    ("int4_ch", "int8", "pack-quantized"),
    ("int8", None, "pack-quantized"),
    ("int8", "int8", "int-quantized"),
]


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("fmt,act,ct_format", SCHEMES)
def test_bf16_checkpoint_loads_with_identical_logprobs(tmp_path, fmt, act, ct_format):
    # compressed-tensors decompresses FP4 to bf16, so the comparison is done on a bf16 model
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    if act == "nvfp4":  # static activation global scale, as the calibrate pass would record
        ctx.stats["act_amax"] = {n: torch.tensor([4.0]) for n, _ in model.named_modules()}
    Quantize(format=fmt, act_format=act, mode="fake").run(model, ctx)
    save_output(model, _NoTokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == ct_format
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        ours = torch.log_softmax(model(ids).logits.float(), -1)
        theirs = torch.log_softmax(loaded(ids).logits.float(), -1)
    assert torch.equal(ours, theirs)


def test_fused_groups_share_one_nvfp4_global_scale_on_disk(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Quantize(format="nvfp4").run(model, ctx)
    save_output(model, _NoTokenizer(), tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        g = {r: f.get_tensor(f"model.layers.0.self_attn.{r}_proj.weight_global_scale") for r in "qkv"}
        assert torch.equal(g["q"], g["k"]) and torch.equal(g["k"], g["v"])
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight_global_scale")
        gate = f.get_tensor("model.layers.0.mlp.gate_proj.weight_global_scale")
        assert torch.equal(up, gate)
