"""CLI: bad inputs give one line on stderr, exit 2, no traceback, and no output left behind."""

import json

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.cli_common import PROGRESS_PREFIX

runner = CliRunner()
FAST = ["--set", "calib.n_samples=2", "--set", "calib.seq_len=32", "--set", "eval.max_windows=2",
        "--set", "eval.seq_len=32", "--set", "eval.kl_samples=2"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=2):
    """The error is one line; plain progress lines (stderr is not a terminal here) may precede it."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(PROGRESS_PREFIX)]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def envelope(result, ok=True):
    """stdout is exactly one JSON object of the documented shape."""
    data = json.loads(result.stdout)
    assert set(data) == {"schema_version", "ok", "error", "report"} and data["schema_version"] == 1
    assert data["ok"] is ok and (data["error"] is None) is ok
    return data


def test_missing_recipe(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    line = one_line_error(run("apply", tmp_path / "none.yaml", tiny_llama_dir, "-o", out))
    assert line == f"error: recipe file {tmp_path / 'none.yaml'} does not exist"
    assert not out.exists()


def test_malformed_yaml(tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    line = one_line_error(run("apply", bad, tiny_llama_dir, "-o", tmp_path / "out"))
    assert line.startswith(f"error: {bad}: malformed YAML at line")
    assert not (tmp_path / "out").exists()


def test_unknown_pass(tmp_path, tiny_llama_dir):
    r = tmp_path / "r.yaml"
    r.write_text("name: x\npasses:\n  - pass: magic\n")
    line = one_line_error(run("apply", r, tiny_llama_dir, "-o", tmp_path / "out"))
    assert line.startswith(f"error: {r}: passes[0].pass: unknown pass 'magic'; known: ")


def test_unknown_field(tmp_path, tiny_llama_dir):
    r = tmp_path / "r.yaml"
    r.write_text("name: x\npasses:\n  - pass: quantize\n    format: int8\n    bits: 8\n")
    assert one_line_error(run("apply", r, tiny_llama_dir, "-o", tmp_path / "out")) == \
        f"error: {r}: passes[0].bits: unknown field"


def test_wrong_type(tmp_path, tiny_llama_dir):
    r = tmp_path / "r.yaml"
    r.write_text("name: x\ncalib:\n  seq_len: long\npasses:\n  - pass: calibrate\n")
    line = one_line_error(run("apply", r, tiny_llama_dir, "-o", tmp_path / "out"))
    assert line.startswith(f"error: {r}: calib.seq_len: Input should be a valid integer")


def test_uncached_hub_model_offline(tmp_path):
    line = one_line_error(run("apply", "int8-w8a8", "no-such-org/no-such-model", "-o", tmp_path / "out"))
    assert line.startswith("error: model 'no-such-org/no-such-model' is not in the local Hugging Face cache")
    assert not (tmp_path / "out").exists()


def test_directory_that_is_not_a_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(run("apply", "int8-w8a8", empty, "-o", tmp_path / "out"))
    assert line == f"error: {empty} is not a model directory (no config.json in it)"


def test_existing_output_without_force(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_line_error(run("apply", "int8-w8a8", tiny_llama_dir, "-o", out))
    assert line == f"error: output {out} exists; pass --force to overwrite it"
    assert (out / "keep.txt").read_text() == "mine"


def test_empty_calibration_text(tmp_path, tiny_llama_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    line = one_line_error(run("apply", "int8-w8a8", tiny_llama_dir, "-o", out, *FAST, "--set", f"calib.source={empty}"))
    assert line == f"error: calibration text {empty} is empty; 2 x 32 tokens are needed"
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_seq_len_beyond_context(tmp_path, tiny_llama_dir):
    line = one_line_error(run("apply", "int8-w8a8", tiny_llama_dir, "-o", tmp_path / "out", "--set", "calib.seq_len=100000"))
    assert line == "error: calibration seq_len 100000 exceeds the model's context length 256"


def test_apply_writes_checkpoint_and_reports(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    result = run("apply", "int8-w8a8", tiny_llama_dir, "-o", out, *FAST, "--json")
    assert result.exit_code == 0, result.stderr
    report = envelope(result)["report"]
    assert report["ppl_before"] > 0 and report["ppl_after"] > 0 and report["kl"] >= 0
    for name in ("model.safetensors", "config.json", "recipe.yaml", "report.json", "report.md", "report.html",
                 "tokenizer.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    errors = report["details"]["layer_weight_error"]  # measured against the source for report.html
    assert len(errors) == 14 and all(0 < e < 0.05 for e in errors.values())  # int8: under 5% per layer
    assert (out / "report.html").read_text().count("<svg") == 3


def test_quality_gate_fails_with_exit_1_and_writes_nothing(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    result = run("apply", "int8-w8a8", tiny_llama_dir, "-o", out, *FAST, "--max-kl", "0")
    line = one_line_error(result, code=1)
    assert line.startswith("error: quality gate failed: mean token KL")
    assert not out.exists()


def test_validate_ok_and_json():
    result = run("validate", "int8-w8a8", "--json")
    assert result.exit_code == 0
    assert envelope(result)["report"]["name"] == "int8-w8a8"


@pytest.mark.parametrize("command", ["recipes", "formats", "passes"])
def test_listing_commands_emit_json(command):
    result = run(command, "--json")
    assert result.exit_code == 0, result.stderr
    rows = envelope(result)["report"]
    assert rows and all("name" in r for r in rows)


def test_inspect_shows_quantized_parts(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    assert run("apply", "int8-w8a8", tiny_llama_dir, "-o", out, *FAST, "--no-eval").exit_code == 0
    result = run("inspect", out, "--json")
    assert result.exit_code == 0, result.stderr
    info = envelope(result)["report"]
    assert info["quant_method"] == "compressed-tensors"
    assert info["quantized_modules"] == 14
    assert info["parts"]["quantized: weight"]["dtypes"] == ["I8"]


def test_inspect_rejects_non_checkpoint(tmp_path):
    assert one_line_error(run("inspect", tmp_path)) == f"error: {tmp_path} is not a checkpoint directory (no config.json in it)"


# --- the --json envelope, streams, progress for logs ---


def test_json_error_is_one_envelope_on_stdout(tmp_path, tiny_llama_dir):
    result = run("apply", tmp_path / "none.yaml", tiny_llama_dir, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 2
    data = envelope(result, ok=False)
    assert data["error"] == {"type": "RecipeError", "exit_code": 2,
                             "message": f"recipe file {tmp_path / 'none.yaml'} does not exist"}
    assert data["report"] is None


def test_json_quality_gate_failure_carries_the_report(tmp_path, tiny_llama_dir):
    result = run("apply", "int8-w8a8", tiny_llama_dir, "-o", tmp_path / "out", *FAST, "--max-kl", "0", "--json")
    assert result.exit_code == 1
    data = envelope(result, ok=False)
    assert data["error"]["type"] == "QualityGateError" and data["error"]["exit_code"] == 1
    assert data["report"]["gates"][0]["ok"] is False


def test_json_usage_error_through_main_is_an_envelope(capsys):
    from quantkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["recipes", "--json", "--no-such-option"])
    assert exc.value.code == 2
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["error"]["type"] == "NoSuchOption" and data["error"]["exit_code"] == 2


def test_listing_without_json_goes_to_stdout_only():
    result = run("recipes")
    assert result.exit_code == 0 and "int8-w8a8" in result.stdout and result.stderr == ""


def test_passes_prints_readable_field_types():
    rows = envelope(run("passes", "--json"))["report"]
    types = {f"{r['name']}.{k}": v["type"] for r in rows for k, v in r["fields"].items()}
    assert not any("typing." in t or "<class" in t for t in types.values()), types
    assert types["gptq.act_format"] == "str | None"
    assert types["gptq.mode"] == "fake | real"  # a Literal reads as its choices
    text = run("passes").stdout
    assert "<class" not in text and "typing." not in text


def test_plain_progress_lines_are_rate_limited_with_eta():
    import io

    from quantkit.cli_common import PlainProgress

    now = [0.0]
    buf = io.StringIO()
    progress = PlainProgress(buf, interval=5.0, clock=lambda: now[0])
    with progress.stage("quantize", 10) as advance:
        for _ in range(10):
            now[0] += 1.0  # one unit per second: a line at most every 5 s
            advance(1)
    lines = buf.getvalue().splitlines()
    assert lines == [
        "[quantkit] quantize: started (0/10)",
        "[quantkit] quantize: 5/10 elapsed 0:05 eta 0:05",
        "[quantkit] quantize: done 10/10 in 0:10",
    ]


def test_every_option_has_help_text():
    import typer.main

    group = typer.main.get_command(app)
    missing = []
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name == "option" and not (param.help or "").strip():
                missing.append(f"{name} {param.opts[0]}")
    assert missing == []


@pytest.mark.parametrize("formats", ["nvfp4", "nvfp4,mxfp4"])
def test_sensitivity_json_has_the_same_envelope_for_one_or_several_formats(formats, tmp_path, monkeypatch):
    import quantkit.models
    from tests.analysis.test_sensitivity import _CharTokenizer, tiny_model

    monkeypatch.setattr(quantkit.models, "load_model", lambda spec, **kw: (tiny_model(), _CharTokenizer()))
    result = run("sensitivity", "tiny", "--format", formats, "--samples", "2", "--seq-len", "16",
                 "--isolation", "component", "-o", tmp_path, "--json")
    assert result.exit_code == 0, result.stderr
    results = envelope(result)["report"]["results"]
    assert [r["format"] for r in results] == formats.split(",")
    assert "most sensitive" in result.stderr  # the tables go to stderr, stdout is the JSON alone


# --- output.layout bnb-int8 ---


def test_layout_bnb_int8_writes_a_checkpoint_bitsandbytes_loads(tmp_path, tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = run("apply", "llm-int8", tiny_llama_dir, "-o", out, *FAST, "--layout", "bnb-int8", "--json")
    assert result.exit_code == 0, result.stderr
    assert envelope(result)["report"]["details"]["layout"] == "bnb-int8"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes" and qcfg["load_in_8bit"] and qcfg["llm_int8_threshold"] == 6.0
    loaded = AutoModelForCausalLM.from_pretrained(out)  # BitsAndBytesConfig from config.json
    assert type(loaded.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "Linear8bitLt"
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        got, want = loaded(ids).logits.float(), ref(ids).logits.float()
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 0.05  # int8 weights: close to the original


def test_layout_bnb_int8_refuses_other_passes_before_loading(tmp_path):
    line = one_line_error(run("apply", "int8-w8a8", "no-such-org/no-such-model", "-o", tmp_path / "out",
                              "--layout", "bnb-int8"))
    assert line == "error: output.layout bnb-int8 holds only LLM.int8 (the llm_int8 pass); this recipe also runs quantize"
