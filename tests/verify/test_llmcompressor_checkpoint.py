"""A checkpoint written by llm-compressor (bench/.venv-llmc) passes verify, and quantkit's NVFP4
bytes equal llm-compressor's, negative-rounds-to-zero code 8 included. Skipped without that venv."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.verify import verify_checkpoint
from tests.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[2]
LLMC_PYTHON = ROOT / "bench" / ".venv-llmc" / "bin" / "python"


def _llmc_available() -> bool:
    if not LLMC_PYTHON.exists():
        return False
    probe = subprocess.run([str(LLMC_PYTHON), "-c", "import llmcompressor"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _llmc_available(), reason="llm-compressor venv (bench/.venv-llmc) not installed")


@pytest.fixture(scope="module")
def source_and_llmc(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("llmc")
    src = root / "src"
    torch.manual_seed(0)
    tiny_model("llama", vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16).save_pretrained(src)
    smollm2_tokenizer.save_pretrained(src)
    calib = root / "calib.json"
    calib.write_text(json.dumps(torch.randint(0, len(smollm2_tokenizer), (2, 32)).tolist()))
    out = root / "llmc-nvfp4"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(LLMC_PYTHON), str(ROOT / "bench/peers/run_llmcompressor.py"), "--model", str(src),
                           "--scheme", "NVFP4", "--calib", str(calib), "--out", str(out), "--json", str(root / "r.json")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return src, out


def test_llmcompressor_nvfp4_checkpoint_passes_verify_with_source(source_and_llmc):
    src, out = source_and_llmc
    r = verify_checkpoint(out, source=str(src))
    assert r.errors == [] and r.warnings == []
    assert r.info["schemes"]["group_0"]["scheme"] == "NVFP4"
    assert r.info["run"]["runtime_rel_max_diff"] <= r.info["run"]["runtime_tolerance"]["rel_max_diff"]
    assert 0.05 < r.info["source"]["max_rel_err"] < 0.2  # NVFP4 round-to-nearest on a Gaussian layer


def test_quantkit_nvfp4_bytes_equal_llmcompressor(source_and_llmc, tmp_path):
    src, llmc = source_and_llmc
    out = tmp_path / "qk"
    res = CliRunner().invoke(app, ["apply", "nvfp4-w4a16", str(src), "-o", str(out), "--no-eval",
                                   "--set", "calib.n_samples=2", "--set", "calib.seq_len=32"])
    assert res.exit_code == 0, res.stderr
    ours, theirs = load_file(out / "model.safetensors"), load_file(llmc / "model.safetensors")
    packed = [k for k in theirs if k.endswith("weight_packed")]
    assert len(packed) == 14
    code8 = 0
    for k in packed:
        assert torch.equal(ours[k], theirs[k]), k
        assert torch.equal(ours[k.replace("packed", "scale")].view(torch.uint8),
                           theirs[k.replace("packed", "scale")].view(torch.uint8)), k
        assert torch.equal(ours[k.replace("packed", "global_scale")], theirs[k.replace("packed", "global_scale")]), k
        code8 += int(((theirs[k] & 0xF) == 8).sum() + ((theirs[k] >> 4) == 8).sum())
    assert code8 > 0  # the case the E2M1 sign rule is about is present
