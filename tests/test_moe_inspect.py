"""`quantkit inspect` on MoE checkpoints lists every expert as quantized (issue 14)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from quantkit.cli import app
from tests.tiny_models import MOE_ARCHS, tiny_model


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_dirs(request, tmp_path_factory, smollm2_tokenizer):
    """(arch, the bf16 source saved by transformers, its nvfp4-w4a16 checkpoint written by quantkit)."""
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp(f"src-{request.param}")
    tiny_model(request.param, vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16).save_pretrained(src)
    smollm2_tokenizer.save_pretrained(src)
    out = tmp_path_factory.mktemp(f"q-{request.param}") / "out"
    result = CliRunner().invoke(app, ["apply", "nvfp4-w4a16", str(src), "-o", str(out), "--no-eval",
                                      "--set", "calib.seq_len=64"])
    assert result.exit_code == 0, result.output
    return request.param, src, out


def _inspect(path, *extra):
    result = CliRunner().invoke(app, ["inspect", str(path), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_inspect_lists_every_expert_quantized(moe_dirs):
    arch, _, out = moe_dirs
    assert "4/4 quantized per layer (2 layers)" in _inspect(out)
    rows = json.loads(_inspect(out, "--json"))["report"]["experts"]
    assert len(rows) == 2  # one experts module per decoder layer
    expected = {"mixtral": ["w1", "w2", "w3"], "qwen2_moe": ["down_proj", "gate_proj", "up_proj"]}[arch]
    for row in rows:
        assert row["experts"] == 4 and row["quantized"] == 4 and row["dense_experts"] == []
        assert row["projections"] == expected


def test_inspect_shows_dense_experts_of_the_source(moe_dirs):
    _, src, _ = moe_dirs
    assert "0/4 quantized per layer (2 layers)" in _inspect(src)


def test_an_expert_missing_its_quantized_projection_is_reported(moe_dirs, tmp_path):
    """One expert written dense in one layer: the line names that layer instead of a clean count."""
    from safetensors.torch import load_file, save_file

    _, _, out = moe_dirs
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((out / "config.json").read_text())
    tensors = load_file(out / "model.safetensors")
    victim = sorted(k for k in tensors if ".layers.1." in k and ".experts.2." in k)
    proj = victim[0].rsplit(".", 1)[0]
    for k in victim:
        if k.startswith(proj + "."):
            del tensors[k]
    tensors[proj + ".weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(tensors, bad / "model.safetensors")
    rows = json.loads(_inspect(bad, "--json"))["report"]["experts"]
    assert [(r["quantized"], r["dense_experts"]) for r in rows] == [(4, []), (3, [2])]
    assert "layers.1" in _inspect(bad) and "3/4 quantized" in _inspect(bad)
