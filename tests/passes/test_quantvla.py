"""QuantVLA ATM/OHB invariants (specs/algorithms.md §4.6) on tiny random models."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_utils import AttentionInterface

from quantkit.passes.quantvla.attn_capture import logit_std
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.errors import CalibrationError, QuantkitError
from quantkit.nn.qlinear import QLinear, quantize_linear
from quantkit.passes.quantvla import (
    AttentionTemperature,
    HeadBalance,
    apply_atm_ohb,
    calibrate_atm_ohb,
    layout_targets,
    measure,
)
from quantkit.passes.quantvla.ratios import clip_ratio, select_sites
from quantkit.recipe import load_recipe
from vla_model import TinyVLA  # tests/passes is on sys.path (rootdir-less test dirs)

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, initializer_range=0.2,  # logit std O(1), so the 1e-6 ratio epsilon is negligible
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY),
    "mistral": lambda: MistralConfig(**TINY),
    "gemma": lambda: GemmaConfig(head_dim=16, **TINY),
    "phi3": lambda: Phi3Config(pad_token_id=0, **TINY),
    "qwen3": lambda: Qwen3Config(head_dim=16, **TINY),  # per-head q_norm with a shared [d] gain
    "olmo2": lambda: Olmo2Config(pad_token_id=0, eos_token_id=1, bos_token_id=2, **TINY),  # q_norm over all rows
}
HEAD_SCALE = torch.tensor([0.8, 1.1, 1.0, 1.3])  # c_h injected on the student's query, 1/c_h inside the clip
OUT_SCALE = 1.2  # g injected on the student's output projection
RECOVERY_RTOL = 1e-5  # the 1e-6 epsilon in std_T / (std_Q + 1e-6) limits exact recovery


def llm(kind: str, impl: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[kind]()
    cfg._attn_implementation = impl
    return AutoModelForCausalLM.from_config(cfg).eval()


def tokens(n: int = 4, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def context(student, teacher, calib=None) -> Context:
    return Context(
        model=student, tokenizer=None, arch=None, device=torch.device("cpu"),
        calib=tokens() if calib is None else calib, batch_size=2, teacher=teacher,
    )


def output(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


class _PerHeadHook:
    """Scale a q-norm's [.., H, d] output per head: injection where q_proj rows can't reach."""

    def __init__(self, c):
        self.c = c

    def __call__(self, _m, _i, out):
        return out * self.c.view(-1, 1) if out.shape[-1] != self.c.numel() * 16 else out * self.c.repeat_interleave(16)


def inject(student, site) -> None:
    """Scale head h of the site's query by c_h and its output projection by g."""
    attn = student.get_submodule(site.name)
    if site.qnorm_path is not None:
        attn.get_submodule(site.qnorm_path).register_forward_hook(_PerHeadHook(HEAD_SCALE))
    else:
        q = attn.get_submodule(site.q_path)
        rows = HEAD_SCALE.repeat_interleave(q.weight.shape[0] // 4 if not site.fused_qkv else 16)
        q.weight.data[: rows.numel()] *= rows[:, None]
        if q.bias is not None:
            q.bias.data[: rows.numel()] *= rows
    o = attn.get_submodule(site.o_path)
    o.weight.data *= OUT_SCALE
    if o.bias is not None:
        o.bias.data *= OUT_SCALE


def run_both(student, teacher, scope: str, **kw) -> Context:
    ctx = context(student, teacher)
    AttentionTemperature(scope=scope, **kw).run(student, ctx)
    HeadBalance(scope=scope).run(student, ctx)
    return ctx


# --- invariant 1: identity -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "vla"])
def test_identity_student_gives_unit_alpha_beta_and_bit_identical_weights(kind):
    teacher = TinyVLA() if kind == "vla" else llm(kind)
    student = copy.deepcopy(teacher)
    ctx = run_both(student, teacher, "dit" if kind == "vla" else "llm")
    assert all(a == 1.0 for row in ctx.report["attention_temperature"]["alpha"].values() for a in row)
    assert all(b == 1.0 for b in ctx.report["head_balance"]["beta"].values())
    for (name, p), (_, p0) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(p, p0), name


# --- invariant 2: recovery -------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*CONFIGS, "vla"])
def test_injected_head_and_layer_scales_are_recovered_and_output_matches_teacher(kind):
    teacher = TinyVLA() if kind == "vla" else llm(kind)
    student = copy.deepcopy(teacher)
    scope = "dit" if kind == "vla" else "llm"
    last = select_sites(student, scope)[-1]  # earlier layers stay identical, so their inputs match
    inject(student, last)
    ctx = run_both(student, teacher, scope)
    alpha = torch.tensor(ctx.report["attention_temperature"]["alpha"][last.name])
    beta = ctx.report["head_balance"]["beta"][last.name]
    torch.testing.assert_close(alpha, 1 / HEAD_SCALE, rtol=RECOVERY_RTOL, atol=0)
    assert beta == pytest.approx(1 / OUT_SCALE, rel=RECOVERY_RTOL)
    ids = tokens(2, 12)
    torch.testing.assert_close(output(student, ids), output(teacher, ids), rtol=1e-4, atol=1e-4)


def test_eager_and_sdpa_attention_give_the_same_alpha():
    tables = []
    for impl in ("eager", "sdpa"):
        teacher = llm("llama", impl)
        student = copy.deepcopy(teacher)
        inject(student, select_sites(student, "llm")[-1])
        tables.append(calibrate_atm_ohb(teacher, student, [tokens()], scope="llm"))
    for name in tables[0]:
        assert tables[0][name]["alpha"] == pytest.approx(tables[1][name]["alpha"], rel=1e-5)


# --- invariant 3: fold == runtime --------------------------------------------------------------


@contextmanager
def query_multiplied_after_rope(model, alpha: dict[str, torch.Tensor]):
    """Reference runtime ATM: query *= α inside the attention function (post-RoPE, post-norm)."""
    ids = {id(model.get_submodule(n)): a for n, a in alpha.items()}
    original = AttentionInterface.get_interface

    def get_interface(self, impl, default):
        fn = original(self, impl, default)

        def scaled(module, query, *args, **kwargs):
            a = ids.get(id(module))
            return fn(module, query if a is None else query * a.view(1, -1, 1, 1), *args, **kwargs)

        return scaled

    AttentionInterface.get_interface = get_interface
    try:
        yield
    finally:
        AttentionInterface.get_interface = original


@pytest.mark.parametrize("kind", ["llama", "phi3", "qwen3", "olmo2", "vla"])
def test_folding_equals_runtime_query_and_output_scaling(kind):
    base = TinyVLA() if kind == "vla" else llm(kind)
    scope = "dit" if kind == "vla" else "llm"
    sites = select_sites(base, scope)
    heads = {s.name: 4 for s in sites}
    alpha = {n: torch.linspace(0.75, 1.35, h) for n, h in heads.items()}
    beta = 1.15
    folded = copy.deepcopy(base)
    d = 8 if kind == "vla" else 16
    apply_atm_ohb(folded, {n: {"alpha": a.tolist(), "beta": beta, "head_dim": d} for n, a in alpha.items()})
    runtime = copy.deepcopy(base)
    for s in sites:
        runtime.get_submodule(f"{s.name}.{s.o_path}").register_forward_hook(lambda m, i, o: o * beta)
    ids = tokens(2, 12)
    with query_multiplied_after_rope(runtime, alpha):
        ref = output(runtime, ids)
    torch.testing.assert_close(output(folded, ids), ref, rtol=1e-4, atol=1e-4)  # fp32 rounding only


def test_folding_into_quantized_q_proj_keeps_codes_and_equals_runtime():
    teacher = llm("llama")
    student = copy.deepcopy(teacher)
    inject(student, select_sites(student, "llm")[-1])  # int8 alone stays inside the neutral band
    for s in select_sites(student, "llm"):
        attn = student.get_submodule(s.name)
        for path in (s.q_path, s.o_path):
            setattr(attn, path, quantize_linear(attn.get_submodule(path), "int8", mode="fake", act_format="int8"))
    runtime = copy.deepcopy(student)
    codes = {n: b.clone() for n, b in student.named_buffers() if n.endswith("weight_codes")}
    ctx = context(student, teacher)
    AttentionTemperature(scope="llm").run(student, ctx)
    HeadBalance(scope="llm").run(student, ctx)
    AttentionTemperature(scope="llm", fold=False).run(runtime, context(runtime, teacher))
    HeadBalance(scope="llm", fold=False).run(runtime, context(runtime, teacher))
    assert set(ctx.report["attention_temperature"]["applied"].values()) == {"q scales"}
    assert set(ctx.report["head_balance"]["applied"].values()) == {"o scales"}
    assert all(torch.equal(b, codes[n]) for n, b in student.named_buffers() if n.endswith("weight_codes"))
    assert any(isinstance(m, QLinear) and m.output_scale is not None for m in student.modules())
    ids = tokens(2, 12)
    torch.testing.assert_close(output(student, ids), output(runtime, ids), rtol=1e-5, atol=1e-5)


# --- invariant 4: clip and neutral band ------------------------------------------------------


def test_alpha_is_clamped_to_the_clip_range():
    assert clip_ratio(torch.tensor([2.0, 0.3]), 0.7, 1.4, 0.02).tolist() == pytest.approx([1.4, 0.7])


def test_alpha_inside_the_neutral_band_is_exactly_one():
    assert clip_ratio(torch.tensor([1.01, 0.985, 1.03]), 0.7, 1.4, 0.02).tolist() == pytest.approx([1.0, 1.0, 1.03])


def test_log_domain_clip_caps_at_exp_limit_and_snaps_small_logs():
    lo, hi = math.exp(-0.3), math.exp(0.3)
    out = clip_ratio(torch.tensor([math.exp(0.5), math.exp(-0.5), math.exp(0.02), math.exp(0.1)]), lo, hi, 0.03, "log")
    assert out.tolist() == pytest.approx([math.exp(0.3), math.exp(-0.3), 1.0, math.exp(0.1)], rel=1e-6)


def test_configured_clip_bounds_the_folded_alpha():
    teacher = llm("llama")
    student = copy.deepcopy(teacher)
    last = select_sites(student, "llm")[-1]
    inject(student, last)
    ctx = context(student, teacher)
    AttentionTemperature(scope="llm", alpha_clip=(0.9, 1.1)).run(student, ctx)
    alpha = ctx.report["attention_temperature"]["alpha"][last.name]
    assert alpha == pytest.approx([1.1, 1 / 1.1, 1.0, 0.9], rel=RECOVERY_RTOL)  # 1.25 and 0.77 capped


# --- invariant 5: std homogeneity ------------------------------------------------------------


def test_logit_std_matches_teacher_after_atm():
    teacher = llm("qwen2")
    student = copy.deepcopy(teacher)
    site = select_sites(student, "llm")[-1]
    inject(student, site)
    AttentionTemperature(scope="llm").run(student, context(student, teacher))
    std_t, _, _ = measure(teacher, [site], [tokens()])
    std_q, _, _ = measure(student, [site], [tokens()])
    torch.testing.assert_close(std_q[site.name], std_t[site.name], rtol=RECOVERY_RTOL, atol=0)


# --- invariant 6: scope ----------------------------------------------------------------------


def test_dit_scope_leaves_language_model_attention_untouched():
    teacher = TinyVLA()
    student = copy.deepcopy(teacher)
    for s in select_sites(student, "all"):
        inject(student, s)
    before = {n: p.clone() for n, p in student.named_parameters() if n.startswith("language_model")}
    ctx = run_both(student, teacher, "dit")
    assert all(n.startswith("action_head") for n in ctx.report["attention_temperature"]["alpha"])
    assert all(n.startswith("action_head") for n in ctx.report["head_balance"]["beta"])
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters() if n.startswith("language_model"))


def test_llm_scope_excludes_the_action_head():
    names = [s.name for s in select_sites(TinyVLA(), "llm")]
    assert names == ["language_model.layers.0.self_attn", "language_model.layers.1.self_attn"]


def test_include_globs_narrow_the_scope():
    names = [s.name for s in select_sites(TinyVLA(), "all", include=["*blocks.1.*"])]
    assert names == ["action_head.blocks.1.attn1"]


def test_dit_scope_on_a_decoder_only_llm_raises_an_actionable_error():
    with pytest.raises(QuantkitError, match="set scope: llm"):
        select_sites(llm("llama"), "dit")


# --- order, teacher, layout, recipes ---------------------------------------------------------


def test_after_atm_false_measures_beta_on_the_student_before_atm():
    teacher = llm("llama")
    results = {}
    for after in (True, False):
        student = copy.deepcopy(teacher)
        last = select_sites(student, "llm")[-1]
        inject(student, last)
        ctx = context(student, teacher)
        AttentionTemperature(scope="llm").run(student, ctx)
        HeadBalance(scope="llm", after_atm=after).run(student, ctx)
        results[after] = ctx.report["head_balance"]["beta"][last.name]
    reference = copy.deepcopy(teacher)
    inject(reference, last)
    table = calibrate_atm_ohb(teacher, reference, list(context(reference, teacher).calib_batches()),
                              scope="llm", ohb_after_atm=False)
    assert results[True] == pytest.approx(1 / OUT_SCALE, rel=RECOVERY_RTOL)
    assert results[False] == pytest.approx(table[last.name]["beta"], rel=1e-6)
    assert results[False] != pytest.approx(results[True], rel=1e-3)


def test_pass_without_a_teacher_raises_calibration_error():
    model = llm("llama")
    with pytest.raises(CalibrationError, match="teacher"):
        AttentionTemperature(scope="llm").run(model, context(model, None))


def test_layout_quantizes_llm_linears_and_dit_mlp_but_not_dit_attention():
    vla = TinyVLA()
    names = layout_targets().select(vla, arch_info(vla.language_model))
    dit = [n for n in names if n.startswith("action_head")]
    assert len([n for n in names if n.startswith("language_model")]) == 2 * 7
    assert sorted(dit) == sorted(f"action_head.blocks.{i}.ff.net.{p}" for i in range(4) for p in ("0.proj", "2"))


@pytest.mark.parametrize("recipe", ["quantvla-w4a8.yaml", "quantvla-nvfp4.yaml"])
def test_recipe_loads_and_its_targets_select_the_paper_layout(recipe):
    loaded = load_recipe(ROOT / "recipes" / recipe)  # field validation + pass order check
    passes = {p.name: p for p in loaded.passes}
    assert passes["attention_temperature"].scope == passes["head_balance"].scope == "dit"
    vla = TinyVLA()
    arch = arch_info(vla.language_model)
    assert passes["quantize"].targets.select(vla, arch) == layout_targets().select(vla, arch)


# --- the logit statistic ---------------------------------------------------------------------


def _qk(heads=4, kv_heads=2, sq=6, sk=6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, heads, sq, 8, generator=g), torch.randn(2, kv_heads, sk, 8, generator=g)


def test_logit_std_excludes_masked_entries():
    q, k = _qk()
    keep = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(4)) > 0.3
    keep[..., 0] = True
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    kr = k.repeat_interleave(2, dim=1)
    logits = q @ kr.transpose(-1, -2) * 0.5  # [b, H, sq, sk]
    expected = torch.stack(
        [torch.stack([logits[b, h][keep[b, 0]].std(unbiased=False) for h in range(4)]) for b in range(2)]
    ).mean(0)
    torch.testing.assert_close(logit_std(q, k, additive, 0.5, causal=False), expected)
    torch.testing.assert_close(logit_std(q, k, keep, 0.5, causal=False), expected)


def test_logit_std_without_mask_on_a_causal_module_uses_the_causal_triangle():
    q, k = _qk()
    tri = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    torch.testing.assert_close(logit_std(q, k, None, 0.5, causal=True), logit_std(q, k, tri, 0.5, causal=False))


def test_logit_std_repeats_kv_heads_for_gqa():
    q, k = _qk(heads=4, kv_heads=2)
    torch.testing.assert_close(
        logit_std(q, k, None, 0.5, causal=False), logit_std(q, k.repeat_interleave(2, dim=1), None, 0.5, causal=False)
    )


# --- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_w4a8_atm_ohb_stay_inside_their_clips():
    from quantkit.models import load_model
    from quantkit.passes.quantize import Quantize

    teacher, tok = load_model("smollm2-135m", dtype="fp32")
    student = copy.deepcopy(teacher)
    ctx = Context(model=student, tokenizer=tok, arch=arch_info(teacher), device=torch.device("cpu"),
                  calib=torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0)), teacher=teacher)
    Quantize(format="int4_ch", act_format="int8", mode="fake").run(student, ctx)
    AttentionTemperature(scope="llm").run(student, ctx)
    HeadBalance(scope="llm").run(student, ctx)
    atm, ohb = ctx.report["attention_temperature"], ctx.report["head_balance"]
    assert atm["modules"] == 30 and atm["heads"] == 30 * 9
    assert 0.7 <= atm["alpha_min"] <= atm["alpha_max"] <= 1.4
    assert math.exp(-0.3) - 1e-6 <= ohb["beta_min"] <= ohb["beta_max"] <= math.exp(0.3) + 1e-6
