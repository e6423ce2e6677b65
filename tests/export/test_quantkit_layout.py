"""quantkit's own checkpoint layout: config, guards, and loading through transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.quantizers import auto as hf_auto

import quantkit.hf_integration  # noqa: F401  (registers quant_method "quantkit")
from quantkit.errors import FormatError, ModelLoadError
from quantkit.export import quantkit_layout as layout
from quantkit.export.quantkit_layout import (
    ModuleHandler,
    install_modules,
    quantkit_state_dict,
    save_quantkit_checkpoint,
    set_module,
    write_quantkit_config,
)
from quantkit.nn.outlier_linear import OutlierLinear

VOCAB = 256


def _tiny(tie: bool = False, bias: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
        attention_bias=bias,
    )
    return LlamaForCausalLM(cfg).eval()


def _quantize(model: nn.Module) -> nn.Module:
    """Every block linear -> OutlierLinear; the three outlier modes are all exercised."""
    for name, mod in list(model.named_modules()):
        if not (isinstance(mod, nn.Linear) and ".layers." in name):
            continue
        if name.endswith("q_proj"):
            new = OutlierLinear.from_linear(mod, threshold=1.0, outliers="static", outlier_idx=torch.tensor([1, 5]))
        elif name.endswith("o_proj"):
            new = OutlierLinear.from_linear(mod, threshold=math.inf)
        else:
            new = OutlierLinear.from_linear(mod, threshold=1.0, bnb_compat=name.endswith("up_proj"))
        set_module(model, name, new)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def test_round_trip_gives_identical_logits(tmp_path):
    model = _quantize(_tiny())
    want = _logits(model)
    save_quantkit_checkpoint(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, OutlierLinear)
    assert torch.equal(_logits(loaded), want)


def test_round_trip_bf16_keeps_int8_codes_and_fp32_scales(tmp_path):
    _tiny().save_pretrained(tmp_path / "dense")
    model = _quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16))
    want = _logits(model)
    save_quantkit_checkpoint(model, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.weight_int8.dtype == torch.int8 and q.weight_absmax.dtype == torch.float32
    assert q.outlier_weight.dtype == torch.bfloat16
    assert torch.equal(_logits(loaded), want)


def test_tied_embeddings_stay_tied(tmp_path):
    model = _quantize(_tiny(tie=True))
    save_quantkit_checkpoint(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(loaded), _logits(model))


def test_without_quantkit_transformers_raises(tmp_path, monkeypatch):
    save_quantkit_checkpoint(_quantize(_tiny()), tmp_path)
    # what a process that never imported quantkit sees: quant_method unknown to transformers
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "quantkit")
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZER_MAPPING, "quantkit")
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_lists_every_module_with_type_and_strict_json():
    model = _quantize(_tiny())
    cfg = write_quantkit_config(model)
    assert cfg["quant_method"] == "quantkit" and cfg["version"]
    assert len(cfg["modules"]) == 2 * 7
    o = cfg["modules"]["model.layers.0.self_attn.o_proj"]
    assert o["type"] == "outlier_linear" and o["threshold"] is None  # inf is written as null
    assert cfg["modules"]["model.layers.0.self_attn.q_proj"]["n_static"] == 2
    json.dumps(cfg, allow_nan=False)


def test_config_json_on_disk_names_quant_method(tmp_path):
    save_quantkit_checkpoint(_quantize(_tiny()), tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "quantkit"


def test_state_dict_has_zero_size_guard_for_each_module():
    sd = quantkit_state_dict(_quantize(_tiny()))
    guard = sd["model.layers.0.mlp.gate_proj.weight"]
    assert guard.numel() == 0
    assert sd["model.layers.0.mlp.gate_proj.weight_int8"].shape == (128, 64)


def test_unknown_module_type_fails_loudly():
    with pytest.raises(ModelLoadError, match="'masa_v9'"):
        install_modules(_tiny(), {"modules": {"model.layers.0.self_attn.q_proj": {"type": "masa_v9"}}})


def test_newer_layout_version_is_rejected():
    with pytest.raises(ModelLoadError, match="upgrade quantkit"):
        install_modules(_tiny(), {"layout_version": 99, "modules": {}})


class _WeightHolder(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 4))


class _WeightHolderHandler(ModuleHandler):
    type_name = "test_weight_holder"
    module_cls = _WeightHolder

    def config(self, module):
        return {}


def test_module_storing_dense_weight_is_rejected(monkeypatch):
    monkeypatch.setitem(layout.QK_MODULE_TYPES._items, "test_weight_holder", _WeightHolderHandler())
    model = _tiny()
    set_module(model, "model.layers.0.mlp.up_proj", _WeightHolder())
    with pytest.raises(FormatError, match="non-empty 'weight'"):
        quantkit_state_dict(model)


# -- a plugin with a shared submodule (the MASA pattern: one atom bank, many users) --------


class _Bank(nn.Module):
    def __init__(self, n: int, d: int):
        super().__init__()
        self.atoms = nn.Parameter(torch.randn(n, d))


class _BankLinear(nn.Module):
    """y = x · (coef · atoms)ᵀ, with atoms found by path so they are stored once."""

    def __init__(self, bank_path: str, out_features: int, n: int, bank: _Bank | None = None):
        super().__init__()
        self.bank_path = bank_path
        self.coef = nn.Parameter(torch.randn(out_features, n))
        self._bank = [bank]  # a list so the bank is not registered (and saved) twice

    def forward(self, x):
        return x @ (self.coef @ self._bank[0].atoms).t()


class _BankHandler(ModuleHandler):
    type_name = "test_bank"
    module_cls = _Bank
    order = -1  # looked up by the linears, so installed first

    def config(self, module):
        return {"n": module.atoms.shape[0], "d": module.atoms.shape[1]}

    def install(self, model, name, cfg):
        set_module(model, name, _Bank(cfg["n"], cfg["d"]))


class _BankLinearHandler(ModuleHandler):
    type_name = "test_bank_linear"
    module_cls = _BankLinear

    def config(self, module):
        return {"bank": module.bank_path, "out": module.coef.shape[0], "n": module.coef.shape[1]}

    def install(self, model, name, cfg):
        bank = model.get_submodule(cfg["bank"])  # installed earlier: entries keep write order
        set_module(model, name, _BankLinear(cfg["bank"], cfg["out"], cfg["n"], bank))


def test_plugin_with_shared_bank_round_trips(tmp_path, monkeypatch):
    monkeypatch.setitem(layout.QK_MODULE_TYPES._items, "test_bank", _BankHandler())
    monkeypatch.setitem(layout.QK_MODULE_TYPES._items, "test_bank_linear", _BankLinearHandler())
    model = _tiny(bias=False)
    bank = _Bank(8, 64)
    set_module(model, "model.qk_bank", bank)  # a new child, listed after the layers
    for i in range(2):
        set_module(model, f"model.layers.{i}.self_attn.q_proj", _BankLinear("model.qk_bank", 64, 8, bank))
    want = _logits(model)
    assert "model.qk_bank" in write_quantkit_config(model)["modules"]
    save_quantkit_checkpoint(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(loaded), want)
