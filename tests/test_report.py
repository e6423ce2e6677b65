"""report.html: self-contained, and the per-layer relative weight error it charts is exact."""

from __future__ import annotations

import re

import pytest
import torch

from quantkit.formats import get_format
from quantkit.nn.qlinear import quantize_linear
from quantkit.report import Report, write_report_html
from quantkit.report_errors import layer_weight_errors
from quantkit.targets import set_module
from tests.tiny_models import tiny_model


def _report(**kw) -> Report:
    r = Report(model="tiny", recipe="nvfp4-w4a16", output="/tmp/x", ppl_before=10.0, ppl_after=10.5,
               seconds={"load": 1.0, "passes": 2.0, "eval": 0.5, "save": 0.3, "total": 3.8},
               passes=[{"index": 0, "pass": "quantize", "seconds": 2.0}],
               gates=[{"gate": "max_kl", "limit": 0.1, "value": 0.01, "ok": True}], **kw)
    r.details["layer_weight_error"] = {f"model.layers.{i}.self_attn.{p}": 0.01 * (i + 1)
                                       for i in range(4) for p in ("q_proj", "o_proj")}
    return r


def test_html_is_self_contained_with_charts_and_sections(tmp_path):
    path = tmp_path / "report.html"
    write_report_html(_report(), path)
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("<svg") == 3  # per-layer error, perplexity, time per stage
    for section in ("Per-layer quantization error", "Perplexity before / after", "Time per stage", "Quality gates"):
        assert section in text
    # nothing fetched: no scripts, stylesheets, images or fonts by URL (SVG's xmlns is a name, not a fetch)
    assert not re.search(r"<(script|link|img|iframe)\b", text)
    assert not re.search(r"(src|href)\s*=\s*['\"]?https?:", text) and "url(http" not in text
    assert "model.layers.3.self_attn.q_proj" in text  # the worst layer is listed


def test_html_without_eval_or_errors_says_so(tmp_path):
    r = Report(model="tiny", recipe="int8-w8a8")
    write_report_html(r, tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text()
    assert "not evaluated in this run" in text and "no per-layer weight error" in text


@pytest.mark.parametrize("fmt", ["int8", "nvfp4"])
def test_layer_weight_error_is_the_relative_frobenius_error(fmt, tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    name = "model.layers.0.self_attn.q_proj"
    w = model.get_submodule(name).weight.detach().clone()
    set_module(model, name, quantize_linear(model.get_submodule(name), fmt))
    errors = layer_weight_errors(model, tmp_path)
    assert list(errors) == [name]  # only quantized layers
    f = get_format(fmt)
    deq = f.dequantize(f.quantize(w.contiguous())).float()
    assert errors[name] == pytest.approx(float((w - deq).norm() / w.norm()), rel=1e-6)
    assert 0 < errors[name] < 0.2
