"""bitsandbytes-compatible LLM.int8 export: loads with BitsAndBytesConfig, same bytes as bnb."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from quantkit.errors import FormatError
from quantkit.export.bnb import export_bnb_int8
from quantkit.export.quantkit_layout import set_module
from quantkit.nn.outlier_linear import OutlierLinear

bnb = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
VOCAB = 256


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # fp16-representable weights: bitsandbytes quantizes an fp16 copy
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def _targets(model) -> list[str]:
    # down_proj left dense on purpose: it must be listed in llm_int8_skip_modules
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n and "down" not in n]


def _replace(model, make) -> nn.Module:
    for name in _targets(model):
        set_module(model, name, make(model.get_submodule(name)))
    return model


def _bnb(linear: nn.Linear) -> nn.Module:
    mod = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              has_fp16_weights=False, threshold=6.0)
    mod.load_state_dict(linear.state_dict())
    return mod.to("cpu").eval()


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def test_export_loads_in_transformers_as_bitsandbytes_and_matches_it(tmp_path):
    ours = _replace(_tiny(), lambda lin: OutlierLinear.from_linear(lin, threshold=6.0, bnb_compat=True))
    export_bnb_int8(ours, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear and type(loaded.lm_head) is nn.Linear
    reference = _replace(_tiny(), _bnb)  # bitsandbytes quantizing the same dense weights itself
    assert torch.equal(_logits(loaded), _logits(reference))


def test_export_writes_bnb_tensor_names_and_config(tmp_path):
    import json

    from safetensors.torch import load_file

    ours = _replace(_tiny(), lambda lin: OutlierLinear.from_linear(lin, threshold=6.0))
    export_bnb_int8(ours, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    p = "model.layers.0.self_attn.q_proj."
    assert sd[p + "weight"].dtype == torch.int8 and sd[p + "SCB"].dtype == torch.float32
    assert sd[p + "weight_format"].item() == 0 and p + "weight_int8" not in sd
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] and qc["llm_int8_threshold"] == 6.0
    assert "lm_head" in qc["llm_int8_skip_modules"]


def test_threshold_inf_is_written_as_bnb_zero(tmp_path):
    import json

    ours = _replace(_tiny(), lambda lin: OutlierLinear.from_linear(lin, threshold=math.inf))
    export_bnb_int8(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["llm_int8_threshold"] == 0.0


def test_static_outliers_are_refused(tmp_path):
    ours = _replace(_tiny(), lambda lin: OutlierLinear.from_linear(lin, outliers="static", outlier_idx=[1]))
    with pytest.raises(FormatError, match="static"):
        export_bnb_int8(ours, tmp_path)


def test_mixed_thresholds_are_refused(tmp_path):
    model = _replace(_tiny(), lambda lin: OutlierLinear.from_linear(lin, threshold=6.0))
    set_module(model, "model.layers.1.mlp.down_proj",
               OutlierLinear.from_linear(model.model.layers[1].mlp.down_proj, threshold=4.0))
    with pytest.raises(FormatError, match="one global threshold"):
        export_bnb_int8(model, tmp_path)
