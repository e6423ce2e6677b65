import json
import math

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.analysis import budget as B
from quantkit.analysis import checks as C
from quantkit.analysis import sweep as S
from quantkit.analysis.report import write_reports
from quantkit.analysis.sensitivity import (
    PARTIAL_NAME,
    RunResult,
    SensitivityError,
    SensitivityResult,
    _fingerprint,
    _save_partial,
    plan_runs,
    run_sensitivity,
)
from quantkit.arch import arch_info
from quantkit.formats import get_format
from quantkit.targets import Targets

VOCAB = 256
LAYERS = 2


def tiny_model(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # larger weights than the 0.02 init, so quantization visibly moves the logits
    return model.to(dtype)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


@pytest.fixture(scope="module")
def result(model, tokens, tmp_path_factory) -> SensitivityResult:
    out = tmp_path_factory.mktemp("sens")
    res = run_sensitivity(model, None, format="nvfp4", tokens=tokens, out_dir=out, budget_bits=5.0, model_name="tiny")
    res.out_dir = out  # for the report tests
    return res


def _sweep(model, tokens, act_quant=False) -> S.Sweep:
    arch = arch_info(model)
    sw = S.Sweep(model, arch, get_format("nvfp4"), tokens, Targets().select(model, arch), act_quant=act_quant)
    sw.reference()
    return sw


def test_plan_has_all_then_seven_components_then_blocks(model):
    arch = arch_info(model)
    runs = plan_runs(arch, Targets().select(model, arch), ("component", "block"))
    assert [r.id for r in runs[:2]] == ["all", "component:q"]
    assert len(runs) == 1 + 7 + LAYERS
    assert all(len(r.modules) == LAYERS for r in runs if r.isolation == "component")


def test_grid_and_complement_runs_select_the_right_modules(model):
    arch = arch_info(model)
    runs = {r.id: r for r in plan_runs(arch, Targets().select(model, arch), ("grid", "block-complement"))}
    assert runs["grid:up:1"].modules == ("model.layers.1.mlp.up_proj",)
    assert all(".layers.0." not in m for m in runs["block-complement:0"].modules)
    assert len(runs["block-complement:0"].modules) == 7 * (LAYERS - 1)


def test_result_has_every_run_metric_and_check(result):
    d = result.to_dict()
    assert {r["id"] for r in d["runs"]} >= {"all", "component:down", "block:1"}
    for r in result.runs:
        assert math.isfinite(r.ppl) and math.isfinite(r.kl) and r.rel == pytest.approx(r.dppl / result.ppl_fp)
    assert [c.id for c in result.checks] == ["C1", "C2", "C3", "C4"]
    assert d["ranking"]["component"][0].startswith("component:")


def test_all_run_is_measurably_worse_than_fp(result):
    assert result.run("all").kl > 0


def test_diagnostics_cover_every_module_with_activation_outliers(result):
    assert len(result.diagnostics) == 7 * LAYERS
    assert all(0.0 <= d["act_outlier_ratio"] <= 1.0 for d in result.diagnostics)
    assert {s["level"] for s in result.spearman} == {"component", "block"}


def test_isolation_changes_only_the_targeted_modules(model, tokens):
    sw = _sweep(model, tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = ["model.layers.1.mlp.up_proj.weight"]
    with sw.quantized([t.removesuffix(".weight") for t in target]):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(target)


def test_weights_and_dtype_restored_bit_exactly_after_sweep(tokens):
    net = tiny_model(seed=1, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run_sensitivity(net, None, format="mxfp4", mode="w4a4", tokens=tokens, isolation="component")
    after = net.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())


def test_every_parameter_and_buffer_restored_on_a_from_pretrained_model(tokens, tmp_path):
    # from_pretrained keeps the non-persistent rotary inv_freq in fp32 inside a bf16 model; state_dict()
    # leaves it out, so compare named_parameters() and named_buffers()
    from transformers import AutoModelForCausalLM

    tiny_model(seed=2).save_pretrained(tmp_path)
    net = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    before = {n: t.clone() for n, t in list(net.named_parameters()) + list(net.named_buffers())}
    assert before["model.rotary_emb.inv_freq"].dtype == torch.float32
    run_sensitivity(net, None, format="nvfp4", tokens=tokens, isolation="component")
    after = dict(list(net.named_parameters()) + list(net.named_buffers()))
    assert after.keys() == before.keys()
    for n, t in before.items():
        assert after[n].dtype == t.dtype and torch.equal(after[n], t), n


def test_fp32_compute_gives_every_tensor_back_even_after_an_error(tmp_path):
    # bench_sensitivity's budget and top-k checks used model.float() ... model.to(bf16), which rounded
    # the fp32 inv_freq and made the second format's sweep start from another model (FP ppl 15.1837
    # vs 15.1849); fp32_compute is the one way back
    from transformers import AutoModelForCausalLM

    from quantkit.analysis.sensitivity import fp32_compute

    tiny_model(seed=3).save_pretrained(tmp_path)
    net = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    net.model.rotary_emb.inv_freq.mul_(1.0 + 2.0**-12)  # values bf16 cannot hold
    before = {n: t.clone() for n, t in list(net.named_parameters()) + list(net.named_buffers())}
    with pytest.raises(RuntimeError), fp32_compute(net):
        assert all(p.dtype == torch.float32 for p in net.parameters())
        raise RuntimeError("inside")
    after = dict(list(net.named_parameters()) + list(net.named_buffers()))
    for n, t in before.items():
        assert after[n].dtype == t.dtype and torch.equal(after[n], t), n
    net.float().to(torch.bfloat16)  # the cast the bench used to do: it does change inv_freq
    assert not torch.equal(net.model.rotary_emb.inv_freq, before["model.rotary_emb.inv_freq"])


def test_no_hooks_left_after_w4a4_runs(model, tokens):
    sw = _sweep(model, tokens, act_quant=True)
    sw.measure(sw.names)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all("forward" not in vars(layer) for layer in arch_info(model).layers(model))


def test_w4a4_hurts_more_than_w4a16(model, tokens):
    w16, w4 = _sweep(model, tokens), _sweep(model, tokens, act_quant=True)
    assert w4.measure(w4.names).kl > w16.measure(w16.names).kl


def test_empty_isolation_reproduces_the_reference(model, tokens):
    sw = _sweep(model, tokens)
    m = sw.measure([])
    assert m.kl == 0.0 and m.ppl == sw.ppl_fp


def test_block_replay_matches_full_recompute(model, tokens):
    sw = _sweep(model, tokens)
    mods = [n for n in sw.names if ".layers.1." in n]
    fast = sw.measure(mods)
    sw.replay = False
    slow = sw.measure(mods)
    assert fast.first_layer == 1 and slow.first_layer == 0
    assert fast.kl == pytest.approx(slow.kl, rel=1e-6) and fast.ppl == pytest.approx(slow.ppl, rel=1e-9)


def test_compact_reference_kl_is_a_close_lower_bound(model, tokens, monkeypatch):
    full = _sweep(model, tokens).measure(["model.layers.0.mlp.down_proj"]).kl
    monkeypatch.setattr(S, "FULL_VOCAB_MAX", 0)
    monkeypatch.setattr(S, "TOPK", 64)
    compact = _sweep(model, tokens).measure(["model.layers.0.mlp.down_proj"]).kl
    assert compact <= full * (1 + 1e-5)
    assert compact > 0.5 * full


def test_resume_reuses_completed_runs(model, tokens, tmp_path):
    fp = _fingerprint("tiny", "nvfp4", "w4a16", tokens)
    marker = RunResult("component:q", "component", "q", None, 2, 123.0, 1.0, 0.01, 0.5, 0.0)
    _save_partial(tmp_path / PARTIAL_NAME, fp, {"component:q": marker.__dict__})
    res = run_sensitivity(model, None, format="nvfp4", tokens=tokens, isolation="component", out_dir=tmp_path,
                          resume=True, model_name="tiny")
    assert res.run("component:q").ppl == 123.0
    assert not (tmp_path / PARTIAL_NAME).exists()  # a finished sweep removes its partial file


def test_resume_rejects_a_partial_from_other_settings(model, tokens, tmp_path):
    _save_partial(tmp_path / PARTIAL_NAME, _fingerprint("tiny", "mxfp4", "w4a16", tokens), {})
    with pytest.raises(SensitivityError, match="other settings"):
        run_sensitivity(model, None, format="nvfp4", tokens=tokens, out_dir=tmp_path, resume=True, model_name="tiny")


@pytest.mark.parametrize("kwargs,match", [({"mode": "w3a3"}, "unknown mode"), ({"metric": "acc"}, "unknown metric"),
                                          ({"isolation": "layer"}, "unknown isolation")])
def test_bad_options_raise_one_line_errors(model, tokens, kwargs, match):
    with pytest.raises(SensitivityError, match=match):
        run_sensitivity(model, None, tokens=tokens, **kwargs)


def test_reports_are_written(result):
    out = result.out_dir
    for name in ("sensitivity.json", "sensitivity.csv", "diagnostics.csv", "sensitivity.md", "sensitivity.html",
                 "recipe_budget.yaml"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["format"] == "nvfp4" and len(data["runs"]) == 1 + 7 + LAYERS
    assert (out / "sensitivity.csv").read_text().splitlines()[0].startswith("model,format,mode,isolation,component,block")


def test_html_is_self_contained_with_embedded_images(result):
    html = (result.out_dir / "sensitivity.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "http://" not in html and "https://" not in html


def test_result_round_trips_through_json(result, tmp_path):
    write_reports(result, tmp_path)
    again = SensitivityResult.from_dict(json.loads((tmp_path / "sensitivity.json").read_text()))
    assert again.component_scores() == pytest.approx(result.component_scores())


def test_budget_recipe_is_a_valid_recipe_within_budget(result):
    from quantkit.recipe import parse_recipe

    recipe = parse_recipe(yaml.safe_load(result.budget["recipe"]))
    assert {p.name for p in recipe.passes} <= {"quantize", "calibrate"}
    assert result.budget["compare"]["guided"]["avg_bits"] <= 5.0 + 1e-9
    named = [n for p in recipe.passes if p.name == "quantize" for n in p.targets.include]
    assert len(named) == len(set(named))  # each module in exactly one pass


def test_bits_per_weight_counts_scale_overhead():
    assert B.bits_per_weight("nvfp4", 1024, 1024) == pytest.approx(4.5 + 32 / 1024**2)
    assert B.bits_per_weight("mxfp4", 8, 64) == 4.25
    assert B.bits_per_weight("int8", 8, 64) == 8.0 + 16 / 64
    assert B.bits_per_weight("bf16", 8, 64) == 16.0


def test_allocate_spends_bits_on_the_sensitive_module():
    shapes = {"a": (64, 64), "b": (64, 64)}
    damage = {"a": {"nvfp4": 10.0, "int8": 0.0}, "b": {"nvfp4": 1.0, "int8": 0.0}}
    budget = (B.bits_per_weight("nvfp4", 64, 64) + B.bits_per_weight("int8", 64, 64)) / 2
    choice = B.allocate([("a",), ("b",)], shapes, damage, ["nvfp4", "int8"], budget)
    assert choice == {"a": "int8", "b": "nvfp4"}


def test_allocate_keeps_fused_groups_in_one_format():
    shapes = {"q": (64, 64), "k": (64, 64), "o": (64, 64)}
    damage = {"q": {"nvfp4": 10.0, "int8": 0.0}, "k": {"nvfp4": 0.0, "int8": 0.0}, "o": {"nvfp4": 1.0, "int8": 0.0}}
    choice = B.allocate([("q", "k"), ("o",)], shapes, damage, ["nvfp4", "int8"], 7.0)
    assert choice["q"] == choice["k"]


def test_allocate_below_the_cheapest_format_raises():
    with pytest.raises(B.BudgetError, match="below"):
        B.allocate([("a",)], {"a": (64, 64)}, {"a": {"nvfp4": 1.0}}, ["nvfp4"], 4.0)


def _synthetic(components: dict[str, float], blocks: dict[int, float], fmt="nvfp4") -> SensitivityResult:
    runs = [RunResult(f"component:{c}", "component", c, None, 1, 10 + v, v, v / 10, v, 0.0) for c, v in components.items()]
    runs += [RunResult(f"block:{b}", "block", None, b, 7, 10 + v, v, v / 10, v, 0.0) for b, v in blocks.items()]
    runs.append(RunResult("all", "all", None, None, 7, 20.0, 10.0, 1.0, 3.0 if fmt == "mxfp4" else 2.0, 0.0))
    return SensitivityResult("m", fmt, "w4a16", "kl", 1, 8, len(blocks), list(components), 10.0, runs)


PAPER_ORDER = {"q": 0.1, "k": 0.1, "v": 0.2, "o": 0.3, "gate": 0.5, "up": 0.9, "down": 1.0}


def test_c1_passes_on_the_paper_ordering_and_fails_otherwise():
    assert C.check_c1(_synthetic(PAPER_ORDER, {})).passed is True
    assert C.check_c1(_synthetic({**PAPER_ORDER, "q": 2.0}, {})).passed is False


def test_c2_looks_for_an_early_block_in_the_top_quartile():
    late = {b: float(b) for b in range(10)}
    assert C.check_c2(_synthetic(PAPER_ORDER, late)).passed is False
    assert C.check_c2(_synthetic(PAPER_ORDER, {**late, 0: 100.0})).passed is True


def test_c3_needs_both_formats_and_compares_all_runs():
    nv, mx = _synthetic(PAPER_ORDER, {}, "nvfp4"), _synthetic(PAPER_ORDER, {}, "mxfp4")
    assert C.check_c3([nv]).passed is None
    assert C.check_c3([nv, mx]).passed is True


def test_c4_compares_component_rankings_across_models():
    a, b = _synthetic(PAPER_ORDER, {}), _synthetic({k: -v for k, v in PAPER_ORDER.items()}, {})
    assert C.check_c4(a, a).passed is True and C.check_c4(a, b).passed is False and C.check_c4(a, None).passed is None


class _CharTokenizer:
    """Byte-ish tokenizer for CLI tests: enough for the held-out windows, no files needed."""

    eos_token_id = 0
    bos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % (VOCAB - 1) for c in text]}


@pytest.fixture
def cli(monkeypatch):
    from typer.testing import CliRunner

    import quantkit.models
    from quantkit.cli import app

    monkeypatch.setattr(quantkit.models, "load_model", lambda spec, **kw: (tiny_model(), _CharTokenizer()))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["sensitivity", "tiny", "--samples", "2", "--seq-len", "16", *args])


def test_cli_writes_reports_and_prints_the_table(cli, tmp_path):
    res = cli("-o", str(tmp_path), "--isolation", "component", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "most sensitive" in res.output and "C1" in res.output
    assert (tmp_path / "nvfp4-w4a16" / "sensitivity.html").exists()


def test_cli_two_formats_evaluate_c3(cli, tmp_path):
    res = cli("-o", str(tmp_path), "--isolation", "component", "--format", "nvfp4,mxfp4", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "mxfp4-w4a16" / "sensitivity.json").read_text())
    assert next(c for c in data["checks"] if c["id"] == "C3")["passed"] is not None


def test_cli_refuses_to_overwrite_without_force(cli, tmp_path):
    assert cli("-o", str(tmp_path), "--isolation", "component").exit_code == 0
    res = cli("-o", str(tmp_path), "--isolation", "component")
    assert res.exit_code == 2 and "already holds a sensitivity report" in res.output


def test_cli_unknown_format_is_a_one_line_usage_error(cli, tmp_path):
    res = cli("-o", str(tmp_path), "--format", "fp3")
    assert res.exit_code == 2 and "unknown format 'fp3'" in res.output


def test_budget_below_the_swept_format_fails_before_the_sweep(model, tokens, monkeypatch):
    monkeypatch.setattr(S.Sweep, "reference", lambda self: pytest.fail("the sweep should not start"))
    with pytest.raises(B.BudgetError, match="below"):
        run_sensitivity(model, None, format="nvfp4", tokens=tokens, budget_bits=4.0)


@pytest.mark.slow
def test_smollm2_component_sweep_restores_the_model():
    from quantkit.models import load_model

    net, tok = load_model("smollm2-135m")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = run_sensitivity(net, tok, format="nvfp4", isolation="component", samples=1, seq_len=32, threads=1)
    assert len(res.runs) == 1 + 7 and res.run("all").kl > 0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
