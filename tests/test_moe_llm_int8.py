"""llm_int8 on MoE models (issue 14): fused experts are refused with one line, never left in 16 bits silently."""

import pytest
import torch
from typer.testing import CliRunner

from quantkit.cli import app
from tests.tiny_models import MOE_ARCHS, tiny_model


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_dir(request, tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"int8-{request.param}")
    tiny_model(request.param, vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _apply(src, out, *extra):
    return CliRunner().invoke(app, ["apply", "llm-int8", str(src), "-o", str(out), "--no-eval",
                                    "--set", "calib.seq_len=64", "--set", "calib.n_samples=2", *extra])


def test_llm_int8_refuses_fused_experts_with_one_line_and_writes_nothing(moe_dir, tmp_path):
    out = tmp_path / "out"
    result = _apply(moe_dir, out)
    assert result.exit_code == 2, result.output
    line = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert line == ["error: llm_int8 cannot decompose fused MoE experts (model.layers.0.mlp.experts and 1 more): "
                    "use an int8 recipe such as int8-w8a16 for MoE models, or leave the experts in 16 bits with "
                    "`targets: {exclude: ['*.experts']}` on this pass"]
    assert not out.exists()


def test_llm_int8_with_experts_excluded_quantizes_the_other_linears(moe_dir, tmp_path):
    import json

    out = tmp_path / "out"
    result = _apply(moe_dir, out, "--set", "passes.1.targets.exclude=['*.experts']")
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "report.json").read_text())["details"]["llm_int8"]["layers"]
    assert layers and not any(".experts" in name for name in layers)
    assert any(name.endswith("self_attn.q_proj") for name in layers)
