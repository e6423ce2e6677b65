"""The llm_int8 pass: which linears it replaces, static outlier columns, the report."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import quantkit.hf_integration  # noqa: F401
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.export.quantkit_layout import save_quantkit_checkpoint
from quantkit.nn.outlier_linear import OutlierLinear
from quantkit.passes.llm_int8 import LlmInt8
from quantkit.targets import Targets

VOCAB, HIDDEN, OUTLIER_COL = 256, 64, 13


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    model = LlamaForCausalLM(cfg).eval()
    # an emergent-outlier feature: the norm's gain makes one q/k/v input column huge
    model.model.layers[0].input_layernorm.weight.data[OUTLIER_COL] = 50.0
    return model


def _ctx(model, calib: bool = True) -> Context:
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    return Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"),
                   calib=ids if calib else None, batch_size=2)


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits


def test_replaces_every_block_linear_but_not_lm_head():
    model = _model()
    LlmInt8(targets=Targets(include=["*"])).run(model, _ctx(model))
    replaced = [n for n, m in model.named_modules() if isinstance(m, OutlierLinear)]
    assert len(replaced) == 2 * 7
    assert not isinstance(model.lm_head, OutlierLinear)


def test_skip_modules_globs_are_respected():
    model = _model()
    LlmInt8(skip_modules=["*.mlp.down_proj"]).run(model, _ctx(model))
    assert not isinstance(model.model.layers[0].mlp.down_proj, OutlierLinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, OutlierLinear)


def test_static_fixes_the_calibration_outlier_column():
    model = _model()
    LlmInt8(outliers="static").run(model, _ctx(model))
    q = model.model.layers[0].self_attn.q_proj
    assert OUTLIER_COL in q.outlier_idx.tolist()
    assert q.outlier_idx.numel() < HIDDEN // 4


def test_report_has_per_layer_counts_and_int8_share():
    model = _model()
    ctx = _ctx(model)
    LlmInt8().run(model, ctx)
    rep = ctx.report["llm_int8"]
    row = rep["layers"]["model.layers.0.self_attn.q_proj"]
    assert row["outlier_cols"] >= 1 and row["outlier_cols_union"] >= 1
    assert 0.0 < row["int8_share"] < 1.0
    assert 0.0 < rep["int8_share"] <= 1.0 and rep["modules"] == 14


def test_threshold_inf_reports_all_int8_without_calibration():
    model = _model()
    ctx = _ctx(model, calib=False)
    LlmInt8(threshold=math.inf).run(model, ctx)
    assert ctx.report["llm_int8"]["int8_share"] == 1.0


def test_static_requires_calibration_dynamic_does_not():
    assert "calib" in LlmInt8(outliers="static").requirements()
    assert "calib" not in LlmInt8().requirements()


def test_negative_threshold_is_rejected():
    with pytest.raises(ValidationError):
        LlmInt8(threshold=-1.0)


@pytest.mark.parametrize("outliers", ["dynamic", "static"])
def test_quantized_model_stays_close_to_dense(outliers):
    model = _model()
    want = _logits(model)
    LlmInt8(outliers=outliers).run(model, _ctx(model))
    got = _logits(model)
    assert ((got - want).norm() / want.norm()).item() < 0.02


def test_static_pass_output_round_trips_through_layout(tmp_path):
    model = _model()
    LlmInt8(outliers="static").run(model, _ctx(model))
    want = _logits(model)
    save_quantkit_checkpoint(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(loaded), want)
