"""`quantkit verify` exit codes: 0 clean, 1 errors found, 2 bad input; --json gives the report."""

import json

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from tests.verify.factory import edit_tensors, write_ct

runner = CliRunner()
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_ct(tmp_path_factory.mktemp("good") / "q", "nvfp4", "nvfp4")


def test_clean_checkpoint_exits_0(good):
    result = runner.invoke(app, ["verify", str(good), "--cheap"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ok q: 0 error(s), 0 warning(s)"


def test_errors_exit_1_with_json_report(good, tmp_path):
    import shutil

    p = tmp_path / "bad"
    shutil.copytree(good, p)
    edit_tensors(p, lambda t: t.pop(f"{Q}.input_global_scale"))
    result = runner.invoke(app, ["verify", str(p), "--cheap", "--json"])
    assert result.exit_code == 1
    env = json.loads(result.stdout)
    assert env["ok"] is False and env["error"]["exit_code"] == 1
    assert env["report"]["errors"] == [{"severity": "error", "check": "tensors.missing", "module": Q,
                                        "message": "static activation scheme without its input scale: NVFP4 needs "
                                                   "input_global_scale, which is missing"}]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: verify found 1 error(s) in {p}; first: {Q}: ")


def test_warnings_do_not_fail(tmp_path):
    p = write_ct(tmp_path / "w4a8", "int4_ch", "int8")  # pack-quantized with activations: vLLM runs it weight-only
    result = runner.invoke(app, ["verify", str(p), "--cheap"])
    assert result.exit_code == 0
    assert "warning [config.format]" in result.stderr


def test_bad_input_exits_2_with_one_line(tmp_path):
    result = runner.invoke(app, ["verify", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'none'} is not a checkpoint directory"
