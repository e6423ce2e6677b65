"""GPTQ: equals RTN without correlations, beats RTN with them, and runs as a pass on a tiny Llama."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.formats import get_format
from quantkit.nn.qlinear import QLinear
from quantkit.passes.gptq import Gptq, gptq_quantize

FORMATS = ["nvfp4", "mxfp4", "int4", "int4_ch"]


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3.0, d)  # [n, d]


@pytest.mark.parametrize("name", FORMATS)
def test_identity_hessian_gives_round_to_nearest_codes(name):
    fmt = get_format(name)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    qt, _ = gptq_quantize(fmt, w, torch.eye(128))
    ref = fmt.quantize(w)
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.scale.view(torch.uint8), ref.scale.view(torch.uint8))


@pytest.mark.parametrize("name", FORMATS)
def test_output_error_is_below_round_to_nearest_on_correlated_inputs(name):
    fmt = get_format(name)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs(2048, 128)
    qt, _ = gptq_quantize(fmt, w, x.T @ x)
    err_gptq = (x @ (fmt.dequantize(qt) - w).T).norm()
    err_rtn = (x @ (fmt.fake(w) - w).T).norm()
    assert err_gptq < err_rtn


def test_given_global_scale_is_kept():
    fmt = get_format("nvfp4")
    w = torch.randn(16, 64)
    gs = fmt.weight_global_scale(w) / 2
    qt, _ = gptq_quantize(fmt, w, torch.eye(64), gs)
    assert qt.global_scale.item() == gs.item()


def test_dead_input_columns_quantize_to_zero():
    fmt = get_format("nvfp4")
    x = _correlated_inputs(512, 64)
    x[:, :16] = 0  # never-active inputs
    qt, _ = gptq_quantize(fmt, torch.randn(8, 64), x.T @ x)
    assert (fmt.dequantize(qt)[:, :16] == 0).all()


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


def _ctx(model) -> Context:
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"), calib=calib)


def test_pass_replaces_every_block_linear_with_a_qlinear():
    model = _tiny_llama()
    ctx = _ctx(model)
    Gptq(format="nvfp4", mode="fake").run(model, ctx)
    linears = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert len(linears) == 2 * 7 and all(ctx.quantized[n]["method"] == "gptq" for n in linears)


def test_pass_shares_the_global_scale_across_q_k_v():
    model = _tiny_llama()
    Gptq(format="nvfp4").run(model, _ctx(model))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight_global_scale == attn.k_proj.weight_global_scale == attn.v_proj.weight_global_scale


def test_pass_output_is_closer_to_the_original_than_round_to_nearest():
    from quantkit.passes.quantize import Quantize

    ref_model, ids = _tiny_llama(), torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(ids).logits
    errs = {}
    for p in (Gptq(format="int4_ch", mode="fake"), Quantize(format="int4_ch", mode="fake")):
        model = _tiny_llama()
        p.run(model, _ctx(model))
        with torch.no_grad():
            errs[p.name] = (model(ids).logits - ref).norm().item()
    assert errs["gptq"] < errs["quantize"]


def test_w4a4_requires_calibrated_activation_stats():
    assert Gptq(format="nvfp4", act_format="nvfp4").requirements() == {"calib", "act_stats", "expert_stats"}
    assert Gptq(format="mxfp4", act_format="mxfp4").requirements() == {"calib"}  # dynamic activations


# -- revised solver: static scales, act-order, observers ------------------------------------------
def _err(fmt, w, qt, x) -> float:
    return (x @ (fmt.dequantize(qt) - w).T).norm().item()


@pytest.mark.parametrize("name", FORMATS)
def test_static_scales_are_the_observers_scales_of_the_original_weights(name):
    fmt = get_format(name)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    x = _correlated_inputs(1024, 128)
    qt, _ = gptq_quantize(fmt, w, x.T @ x)
    assert torch.equal(qt.scale.view(torch.uint8) if qt.scale.element_size() == 1 else qt.scale,
                       fmt.quantize(w).scale.view(torch.uint8) if qt.scale.element_size() == 1 else fmt.quantize(w).scale)


@pytest.mark.parametrize("observer", ["e4m3_local", "four_over_six"])
def test_static_scales_from_a_search_observer(observer):
    from quantkit.formats.observers import OBSERVERS

    fmt = get_format("nvfp4")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    x = _correlated_inputs(1024, 128)
    qt, _ = gptq_quantize(fmt, w, x.T @ x, observer=observer)
    scale, gs = OBSERVERS.get(observer).scales(fmt, w, fmt.weight_global_scale(w))
    assert torch.equal(qt.scale.view(torch.uint8), scale.view(torch.uint8)) and qt.global_scale.item() == gs.item()
    assert _err(fmt, w, qt, x) < _err(fmt, w, OBSERVERS.get(observer)(fmt, w), x)  # GPTQ still helps


@pytest.mark.parametrize("name", FORMATS)
def test_act_order_keeps_the_layout_and_beats_round_to_nearest(name):
    fmt = get_format(name)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    x = _correlated_inputs(2048, 128)
    qt, _ = gptq_quantize(fmt, w, x.T @ x, act_order=True)
    ref = fmt.quantize(w)
    assert qt.codes.shape == ref.codes.shape and qt.scale.shape == ref.scale.shape
    assert _err(fmt, w, qt, x) < _err(fmt, w, ref, x)


def test_act_order_with_identity_hessian_is_round_to_nearest():
    fmt = get_format("nvfp4")
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    qt, _ = gptq_quantize(fmt, w, torch.diag(torch.rand(64) + 0.5), act_order=True)
    assert torch.equal(qt.codes, fmt.quantize(w).codes)


def test_dynamic_scales_still_available_and_act_order_needs_static():
    fmt = get_format("nvfp4")
    w, x = torch.randn(16, 64), _correlated_inputs(256, 64)
    qt, _ = gptq_quantize(fmt, w, x.T @ x, static_scales=False)
    assert qt.codes.shape == (16, 32)
    with pytest.raises(ValueError, match="static scales"):
        gptq_quantize(fmt, w, x.T @ x, static_scales=False, act_order=True)


@pytest.mark.parametrize("weighting", ["channel", "hessian"])
def test_hessian_weighted_observer_scales_run(weighting):
    fmt = get_format("nvfp4")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    x = _correlated_inputs(1024, 128)
    qt, _ = gptq_quantize(fmt, w, x.T @ x, observer="e4m3_local", weighting=weighting)
    assert _err(fmt, w, qt, x) < _err(fmt, w, fmt.quantize(w), x)


# -- solver failures and the pass's knobs ---------------------------------------------------------
@pytest.mark.parametrize("h", [-torch.eye(64), torch.full((64, 64), float("nan"))], ids=["negative", "nan"])
def test_a_hessian_the_solver_cannot_factor_is_a_solver_error_naming_the_knobs(h):
    from quantkit.errors import QuantkitError, SolverError

    with pytest.raises(SolverError, match="raise gptq dampening.* or add calibration samples") as info:
        gptq_quantize(get_format("nvfp4"), torch.randn(8, 64), h)
    assert isinstance(info.value, QuantkitError) and "\n" not in str(info.value)


def test_pass_passes_act_order_and_weighting_to_the_solver():
    model = _tiny_llama()
    ctx = _ctx(model)
    Gptq(format="nvfp4", mode="fake", observer="e4m3_local", weighting="hessian", act_order=True).run(model, ctx)
    row = ctx.report["gptq"]
    assert row["act_order"] is True and row["weighting"] == "hessian" and row["observer"] == "e4m3_local"
    ref = _tiny_llama()
    plain = _tiny_llama()
    Gptq(format="nvfp4", mode="fake", observer="e4m3_local").run(plain, _ctx(plain))
    q = model.model.layers[0].mlp.down_proj
    assert not torch.equal(q.dequantized_weight(), plain.model.layers[0].mlp.down_proj.dequantized_weight())
    assert q.qweight.codes.shape == plain.model.layers[0].mlp.down_proj.qweight.codes.shape
    del ref


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_fast_column_rounding_equals_the_formats_qdq(name):
    from quantkit.passes.gptq.solver import _column_rounder, _qdq_column

    fmt = get_format(name)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 4 * fmt.block, generator=g) * torch.logspace(-3, 2, 64)[:, None]
    w[:3, : fmt.block] = 0  # zero blocks: zero scale
    gs = fmt.weight_global_scale(w)
    scales = fmt.quantize(w, gs).scale  # [64, 4]
    cols = torch.randn(64, 4 * fmt.block, generator=g) * 3  # GPTQ-updated columns: not the scale's own block
    col_scales = scales[:, torch.arange(4 * fmt.block) // fmt.block]
    fast = _column_rounder(fmt, col_scales, gs)
    for i in range(cols.shape[1]):
        ref = _qdq_column(fmt, cols[:, i], col_scales[:, i], gs)
        assert torch.equal(torch.nan_to_num(fast(cols[:, i], i), nan=7.0), torch.nan_to_num(ref, nan=7.0)), i


# -- sequential: true (true-sequential inside a block) ----------------------------------------------
def test_sequential_stages_follow_the_data_flow():
    from quantkit.passes.gptq import input_stages

    model = _tiny_llama()
    ctx = _ctx(model)
    names = sorted(n for n, _r, _k in ctx.arch.linears(1))  # alphabetical: mlp before self_attn
    assert [[n.rsplit(".", 1)[1] for n in g] for g in input_stages(ctx, 1, names)] == [
        ["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_sequential_takes_each_stage_hessian_after_the_earlier_stages_are_quantized(monkeypatch):
    import copy

    import quantkit.passes.input_stats as stats_mod  # gptq measures through input_stats.hessians

    seen = {}

    def recording(blk, names, kind):
        out = recording.__wrapped__(blk, names, kind)
        seen.update({n: h.clone() for n, h in out.items()})
        return out

    recording.__wrapped__ = stats_mod.input_second_moments
    monkeypatch.setattr(stats_mod, "input_second_moments", recording)
    base, seq = _tiny_llama(), _tiny_llama()
    Gptq(format="nvfp4", mode="fake", act_order=True).run(base, _ctx(base))
    h_base = dict(seen)
    ctx = _ctx(seq)
    Gptq(format="nvfp4", mode="fake", act_order=True, sequential=True).run(seq, ctx)
    assert ctx.report["gptq"]["sequential"] is True
    a0, s0 = base.model.layers[0].self_attn, seq.model.layers[0].self_attn
    # q/k/v read the block's input, which nothing quantized touches in block 0: the same codes
    assert all(torch.equal(getattr(a0, n).qweight.codes, getattr(s0, n).qweight.codes)
               for n in ("q_proj", "k_proj", "v_proj"))
    # o_proj's Hessian by hand: from an unquantized model whose block-0 q/k/v are the sequential run's
    ref = _tiny_llama()
    for n in ("q_proj", "k_proj", "v_proj"):
        setattr(ref.model.layers[0].self_attn, n, copy.deepcopy(getattr(s0, n)))
    calib = _ctx(ref).calib  # before the hook: arch_info traces a block forward
    h = {}

    def hook(_m, a):
        x = a[0].reshape(-1, a[0].shape[-1]).float()
        h["h"] = h.get("h", 0) + x.T @ x

    ref.model.layers[0].self_attn.o_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        ref(calib)
    o = "model.layers.0.self_attn.o_proj"
    assert torch.allclose(seen[o], h["h"], rtol=1e-4, atol=1e-4 * h["h"].abs().max().item())
    assert not torch.allclose(h_base[o], h["h"], rtol=1e-3, atol=1e-3 * h["h"].abs().max().item())


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "int4"])
def test_linears_sharing_an_input_solved_as_one_matrix_get_the_codes_they_get_alone(name):
    """The pass stacks q/k/v (gate/up) into one solve: the rows are independent given H, so each linear's codes,
    scales and loss are the ones a solve of its own gives (here with act-order and the CD refinement)."""
    from quantkit.passes.gptq import Gptq

    fmt = get_format(name)
    x = _correlated_inputs(1024, 128, seed=3)
    h = x.T @ x
    ws = [torch.randn(r, 128, generator=torch.Generator().manual_seed(r)).to(torch.bfloat16) for r in (64, 32, 16)]
    gs = None if fmt.weight_global_scale(ws[0]) is None else min(fmt.weight_global_scale(w) for w in ws)
    p = Gptq(format=name, act_order=True, dampening=0.1, refine_sweeps=2)
    kw = dict(block_size=p.block_size, dampening=p.dampening, act_order=True, refine_sweeps=2)
    together = p._solve(["q", "k", "v"], ws, h, gs)
    for n, w in zip("qkv", ws):
        alone, info = gptq_quantize(fmt, w, h, gs, **kw)
        qt, part = together[n]
        assert qt.shape == alone.shape and torch.equal(qt.codes, alone.codes)
        assert torch.equal(qt.scale.float(), alone.scale.float())
        assert part["loss"] == pytest.approx(info["loss"], rel=1e-6)
    assert "refine" in together["q"][1] and "refine" not in together["k"][1]  # the refinement's totals once
