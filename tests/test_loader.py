"""Any PyTorch model: apply(model=<nn.Module>), --loader module:function / file.py:function, the tiny
VLA through the CLI with saving and reload, the scope check before calibration (issue 13, item 7)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantkit.api import apply
from quantkit.cli import app
from quantkit.cli_common import PROGRESS_PREFIX
from quantkit.errors import QuantkitError, RecipeError
from quantkit.loaders import load_checkpoint
from quantkit.recipe import load_recipe
from tests.tiny_models import tiny_model

PASSES_DIR = Path(__file__).parent / "passes"  # tests/passes/vla_model.py: the tiny VLA
sys.path.insert(0, str(PASSES_DIR))
from vla_model import TinyVLA  # noqa: E402

runner = CliRunner()
NO_EVAL = ["eval.enabled=false"]
SMALL = ["calib.n_samples=2", "calib.seq_len=32"]

# a loader file: the tiny VLA plus calibration batches of input_ids (it has no tokenizer)
VLA_LOADER = textwrap.dedent(f"""
    import sys
    import torch
    sys.path.insert(0, {str(PASSES_DIR)!r})
    from vla_model import TinyVLA

    def calib():
        g = torch.Generator().manual_seed(7)
        return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)]

    def load():
        return {{"model": TinyVLA().eval(), "calib": calib()}}

    def load_seeded(seed):
        return TinyVLA(seed=int(seed)).eval(), None, calib()

    def not_a_model():
        return 42

    def broken():
        raise RuntimeError("weights not found")
""")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=2) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith(PROGRESS_PREFIX)]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def vla_loader(tmp_path) -> Path:
    path = tmp_path / "vla_loader.py"
    path.write_text(VLA_LOADER)
    return path


def _vla_calib():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(2)]


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


# --- apply(model=<nn.Module>) -------------------------------------------------------------------


def test_apply_model_module_writes_a_checkpoint_that_reloads_with_equal_logits(tmp_path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    out = tmp_path / "out"
    report = apply(load_recipe("int8-w8a8", NO_EVAL + SMALL), model=model, tokenizer=smollm2_tokenizer, output=out)
    assert report.details["execution"] == {"mode": "whole", "why": "model given in memory"}
    assert report.model == "<in-memory LlamaForCausalLM>"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        want = report.model_obj(_ids(len(smollm2_tokenizer))).logits
        got = loaded(_ids(len(smollm2_tokenizer))).logits
    # fp32 model: compressed-tensors' decompressed weights vs quantkit's fake-quant cache differ by
    # float rounding order only (measured max |diff| 3e-7 on logits of magnitude ~0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, tiny_model("llama", vocab_size=len(smollm2_tokenizer))(_ids(len(smollm2_tokenizer))).logits,
                              atol=1e-3)  # and the checkpoint is not simply the unquantized model


def test_apply_model_module_writes_the_same_bytes_as_the_spec_path(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe("int8-w8a8", NO_EVAL + SMALL)
    apply(recipe, str(tiny_llama_dir), output=tmp_path / "spec", execution="whole")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    apply(recipe, model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_llama_dir), output=tmp_path / "module")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "spec" / name).read_bytes() == (tmp_path / "module" / name).read_bytes(), name


def test_apply_takes_a_module_positionally_too(tmp_path):
    report = apply(load_recipe("int8-w8a16", NO_EVAL), TinyVLA().language_model, output=None)
    assert report.details["quantize"]["modules"] == 14  # 2 layers x 7 linears, no calibration data needed


def test_in_memory_model_refuses_streaming_in_one_line(tmp_path):
    with pytest.raises(RecipeError, match="a model given in memory runs with execution: whole"):
        apply(load_recipe("int8-w8a16", NO_EVAL), model=TinyVLA(), output=tmp_path / "o", execution="streaming")
    assert not (tmp_path / "o").exists()


def test_apply_wants_exactly_one_model():
    with pytest.raises(QuantkitError, match="apply needs one model"):
        apply(load_recipe("int8-w8a16", NO_EVAL), "x", model=TinyVLA())


def test_model_without_a_tokenizer_skips_evaluation_and_refuses_gates(tmp_path):
    report = apply(load_recipe("int8-w8a16"), model=TinyVLA(), output=None)
    assert "skipped" in report.details["eval"] and report.ppl_before is None
    with pytest.raises(RecipeError, match="quality gates need perplexity"):
        apply(load_recipe("int8-w8a16"), model=TinyVLA(), output=None, max_kl=0.1)


# --- calibration batches from the caller --------------------------------------------------------


class _Counting:
    """An iterable of batches that counts what was consumed."""

    def __init__(self, batches):
        self.batches, self.consumed = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.consumed += 1
            yield b


def _input_scales(model) -> dict[str, torch.Tensor]:
    return {n: m.input_global_scale.clone() for n, m in model.named_modules()
            if getattr(m, "input_global_scale", None) is not None}


def test_given_calibration_batches_replace_the_recipe_data(smollm2_tokenizer):
    recipe = load_recipe("nvfp4-w4a4", NO_EVAL + SMALL)  # static NVFP4 activation scales from calibration
    vocab = len(smollm2_tokenizer)

    def fresh():
        torch.manual_seed(0)
        return tiny_model("llama", vocab_size=vocab)

    default = apply(recipe, model=fresh(), tokenizer=smollm2_tokenizer, output=None)
    g = torch.Generator().manual_seed(11)
    given = _Counting([torch.randint(0, 50, (2, 24), generator=g) for _ in range(3)])  # a narrow token range
    ours = apply(recipe, model=fresh(), tokenizer=smollm2_tokenizer, calib_batches=given, output=None)
    assert given.consumed == 3
    calib_row = ours.details["calibrate"]
    assert (calib_row["source"], calib_row["n_samples"], calib_row["seq_len"]) == ("loader", 6, 24)
    a, b = _input_scales(default.model_obj), _input_scales(ours.model_obj)
    assert a.keys() == b.keys() and len(a) == 14
    assert sum(not torch.equal(a[n], b[n]) for n in a) >= 10  # statistics come from the given batches


def test_dict_batches_are_passed_as_forward_kwargs():
    seen = []

    class Recording(torch.nn.Module):  # a wrapper whose forward takes its own keyword
        def __init__(self):
            super().__init__()
            self.vla = TinyVLA()

        def forward(self, tokens):
            seen.append(tokens.shape)
            return self.vla(tokens)

    batches = [{"tokens": b} for b in _vla_calib()]
    report = apply(load_recipe("quantvla-w4a8", NO_EVAL), model=Recording(), calib_batches=batches, output=None)
    assert report.details["attention_temperature"]["modules"] == 4
    assert len(seen) >= 2 * 3  # block capture, then teacher and student for ATM (OHB re-measures too)


# --- the tiny VLA through the CLI loader ------------------------------------------------------


def test_tiny_vla_through_the_cli_loader_saves_and_reloads(tmp_path, vla_loader):
    out = tmp_path / "vla-out"
    result = run("apply", "quantvla-w4a8", "--loader", f"{vla_loader}:load", "-o", out, "--no-eval", "--json")
    assert result.exit_code == 0, result.stderr
    rep = json.loads(result.stdout)["report"]
    assert rep["model"] == f"loader:{vla_loader}:load"
    atm = rep["details"]["attention_temperature"]
    assert all(name.startswith("action_head.") for name in atm["alpha"])  # scope dit: the action head only
    # the teacher is the model as loaded: a quantized backbone shifts some DiT logit stds (alpha != 1)
    assert any(a != 1.0 for row in atm["alpha"].values() for a in row)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "quantkit-module" and config["architectures"] == ["TinyVLA"]
    assert "language_model" in config["sub_configs"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"

    # the same run in process gives the in-memory quantized model to compare the reload with
    mem = apply(load_recipe("quantvla-w4a8", NO_EVAL), model=TinyVLA().eval(), calib_batches=_vla_calib(),
                output=None).model_obj
    fake = load_checkpoint(out, TinyVLA(seed=5).eval(), mode="fake")  # other seed: every tensor comes from disk
    real = load_checkpoint(out, TinyVLA(seed=5).eval(), mode="real")
    # inference_mode: quantkit's real-mode kernels keep a process-wide scratch tile, made by the
    # CLI run above under inference_mode, that cannot be written under plain no_grad
    with torch.inference_mode():
        want = mem(_ids())
        assert torch.equal(fake(_ids()), want)
        torch.testing.assert_close(real(_ids()), want, rtol=1e-4, atol=1e-4)  # int8 kernels vs the float path
        assert not torch.equal(TinyVLA(seed=5)(_ids()), want)


def test_loader_module_function_form_with_the_model_argument(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "vla.py").write_text(VLA_LOADER)
    monkeypatch.chdir(tmp_path)  # importable from the current directory
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    monkeypatch.delitem(sys.modules, "mypkg.vla", raising=False)
    out = tmp_path / "o"
    result = run("apply", "int8-w8a16", "3", "--loader", "mypkg.vla:load_seeded", "-o", out, "--no-eval", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["report"]["model"] == "loader:mypkg.vla:load_seeded(3)"
    reloaded = load_checkpoint(out, TinyVLA(seed=0).eval(), mode="fake")
    mem = apply(load_recipe("int8-w8a16", NO_EVAL), model=TinyVLA(seed=3).eval(), output=None).model_obj
    with torch.inference_mode():
        assert torch.equal(reloaded(_ids()), mem(_ids()))


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "--loader 'nocolon': expected package.module:function or path/to/file.py:function"),
    ("no_such_pkg_xyz.mod:load", "--loader 'no_such_pkg_xyz.mod:load': no module named 'no_such_pkg_xyz.mod' "
                                 "(run from the folder that holds it, or give path/to/file.py:function)"),
    ("{dir}/missing.py:load", "--loader '{dir}/missing.py:load': file {dir}/missing.py does not exist"),
    ("{loader}:nothing", "--loader '{loader}:nothing': {loader} has no attribute 'nothing'"),
    ("{loader}:not_a_model", "--loader '{loader}:not_a_model': returned int; expected an nn.Module, a tuple "
                             "(model, tokenizer, calib) or a dict with 'model'"),
    ("{loader}:broken", "--loader '{loader}:broken': the loader raised RuntimeError: weights not found"),
])
def test_bad_loader_spec_is_one_line_exit_2(tmp_path, vla_loader, spec, message):
    fill = {"dir": tmp_path, "loader": vla_loader}
    out = tmp_path / "out"
    line = one_line_error(run("apply", "int8-w8a16", "--loader", spec.format(**fill), "-o", out, "--no-eval"))
    assert line == "error: " + message.format(**fill)
    assert not out.exists()


def test_output_checks_run_before_the_loader_in_the_cli_and_the_library(tmp_path):
    """An output apply would refuse (exists, no --force) fails before the loader is called."""
    marker = tmp_path / "called"
    path = tmp_path / "marking_loader.py"
    path.write_text(f"def load():\n    open({str(marker)!r}, 'w').close()\n    raise RuntimeError('loaded')\n")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep").write_text("x")
    line = one_line_error(run("apply", "int8-w8a16", "--loader", f"{path}:load", "-o", out, "--no-eval"))
    assert line.startswith(f"error: output {out} exists") and not marker.exists()
    with pytest.raises(QuantkitError, match="exists"):
        apply(load_recipe("int8-w8a16", NO_EVAL), loader=f"{path}:load", output=out)
    assert not marker.exists() and (out / "keep").read_text() == "x"
    # and the loader does run when the output is free: its error is the one reported
    line = one_line_error(run("apply", "int8-w8a16", "--loader", f"{path}:load", "-o", tmp_path / "new", "--no-eval"))
    assert line == f"error: --loader '{path}:load': the loader raised RuntimeError: loaded" and marker.exists()


def test_library_apply_takes_a_loader_spec_like_the_cli(tmp_path, vla_loader):
    report = apply(load_recipe("int8-w8a16", NO_EVAL), "3", loader=f"{vla_loader}:load_seeded", output=None)
    assert report.model == f"loader:{vla_loader}:load_seeded(3)"
    mem = apply(load_recipe("int8-w8a16", NO_EVAL), model=TinyVLA(seed=3).eval(), output=None).model_obj
    with torch.inference_mode():
        assert torch.equal(report.model_obj(_ids()), mem(_ids()))
    with pytest.raises(QuantkitError, match="loader= gives the model, tokenizer and calibration batches"):
        apply(load_recipe("int8-w8a16", NO_EVAL), model=TinyVLA(), loader=f"{vla_loader}:load", output=None)


def test_apply_without_model_or_loader_is_one_line(tmp_path):
    line = one_line_error(run("apply", "int8-w8a16", "-o", tmp_path / "o"))
    assert line == "error: apply needs a MODEL argument or --loader package.module:function"


# --- the scope check comes right after loading ------------------------------------------------


@pytest.fixture
def calibration_forbidden(monkeypatch):
    """Calibration must not start: loading the buffer raises an internal error (exit 3)."""
    import quantkit.passes.calibrate as calibrate

    def boom(*_a, **_k):
        raise AssertionError("calibration ran before the scope check")

    monkeypatch.setattr(calibrate, "load_calib_config", boom)


DIT_SCOPE_ERROR = ("error: attention_temperature: QuantVLA scope 'dit' matched no attention modules "
                   "(a decoder-only LLM has no DiT: set scope: llm)")


def test_dit_scope_on_an_llm_fails_before_calibration(tmp_path, tiny_llama_dir, calibration_forbidden):
    out = tmp_path / "o"
    line = one_line_error(run("apply", "quantvla-w4a8", tiny_llama_dir, "-o", out, "--no-eval"))
    assert line == DIT_SCOPE_ERROR
    assert not out.exists()


def test_dit_scope_on_a_loader_llm_fails_before_calibration(tmp_path, calibration_forbidden):
    path = tmp_path / "llm_loader.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(PASSES_DIR)!r})\nfrom vla_model import TinyVLA\n"
                    "def load():\n    return TinyVLA().language_model\n")
    line = one_line_error(run("apply", "quantvla-w4a8", "--loader", f"{path}:load", "-o", tmp_path / "o", "--no-eval"))
    assert line == DIT_SCOPE_ERROR


# --- bnb-int8 written by the writer, from the library ------------------------------------------


def _bnb_recipe():
    return load_recipe("llm-int8", NO_EVAL + SMALL + ["output.layout=bnb-int8"])


def test_library_apply_honours_output_layout_bnb_int8(tmp_path, tiny_llama_dir):
    from safetensors import safe_open

    out = tmp_path / "bnb"
    report = apply(_bnb_recipe(), str(tiny_llama_dir), output=out, execution="whole")
    assert report.details["layout"] == "bnb-int8"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] and "lm_head" in qc["llm_int8_skip_modules"]
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
    assert "model.layers.0.self_attn.q_proj.SCB" in keys and not any(k.endswith("weight_int8") for k in keys)
    assert {p.name for p in tmp_path.iterdir()} == {"bnb"}  # written in a temporary dir and renamed
    assert (out / "report.json").exists() and (out / "recipe.yaml").exists()


def test_bnb_int8_streams_block_by_block_with_the_same_bytes(tmp_path, tiny_llama_dir):
    apply(_bnb_recipe(), str(tiny_llama_dir), output=tmp_path / "w", execution="whole")
    apply(_bnb_recipe(), str(tiny_llama_dir), output=tmp_path / "s", execution="streaming")
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == (tmp_path / "s" / "model.safetensors").read_bytes()
    assert (tmp_path / "w" / "config.json").read_text() == (tmp_path / "s" / "config.json").read_text()


def test_bnb_int8_from_library_loads_with_bitsandbytes(tmp_path, tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bnb"
    apply(_bnb_recipe(), str(tiny_llama_dir), output=out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded.get_submodule("model.layers.0.self_attn.q_proj")).__name__ == "Linear8bitLt"
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.arange(1, 17).unsqueeze(0)).logits.float()).all()


def test_bnb_int8_refuses_other_passes_before_loading(tmp_path):
    from quantkit.errors import FormatError

    recipe = load_recipe("int8-w8a8", ["output.layout=bnb-int8"])
    with pytest.raises(FormatError, match="holds only LLM.int8"):
        apply(recipe, "no-such-org/no-such-model", output=tmp_path / "o")


# --- every shipped QuantVLA recipe runs on something quantkit loads ------------------------------


@pytest.mark.parametrize("recipe", ["quantvla-w4a8", "quantvla-nvfp4"])
def test_shipped_dit_recipes_run_on_the_tiny_vla_through_a_loader(tmp_path, vla_loader, recipe):
    out = tmp_path / "o"
    result = run("apply", recipe, "--loader", f"{vla_loader}:load", "-o", out, "--no-eval", "--json")
    assert result.exit_code == 0, result.stderr
    details = json.loads(result.stdout)["report"]["details"]
    assert details["attention_temperature"]["modules"] == details["head_balance"]["modules"] == 4
    assert out.exists() == (recipe != "quantvla-nvfp4")  # the NVFP4 variant is an accuracy study (save: false)


def test_shipped_llm_scope_recipe_runs_on_a_decoder_only_model(tmp_path, tiny_llama_dir):
    result = run("apply", "quantvla-llm-w4a8", tiny_llama_dir, "-o", tmp_path / "o", "--no-eval", "--json",
                 "--set", "calib.n_samples=2", "--set", "calib.seq_len=32")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["report"]["details"]["attention_temperature"]["modules"] == 2
