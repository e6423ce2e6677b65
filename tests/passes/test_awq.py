"""awq: scales folded exactly where a fold is found (any architecture), left alone where none is,
the search never worse than no scaling on its objective, and the recipe order it needs."""

import copy

import pytest
import torch

from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.errors import RecipeError
from quantkit.formats import get_format
from quantkit.passes.awq import Awq
from quantkit.passes.calibrate import Calibrate
from tests.tiny_models import TINY_CONFIGS, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM


def _ctx(model) -> Context:
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"), calib=calib)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _with_outlier_channels(model):
    """Random models have flat activations; give the norms a few large channels, as trained models have."""
    g = torch.Generator().manual_seed(3)
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if "norm" in name.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
            with torch.no_grad():
                w.mul_(torch.where(torch.rand(w.shape, generator=g) < 0.1, 8.0, 1.0))
    return model


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_the_model_computes_the_same_function_after_awq(arch):
    model = _with_outlier_channels(tiny_model(arch))
    ref = _logits(model, IDS)
    ctx = _ctx(model)
    Awq(format="nvfp4").run(model, ctx)
    out = _logits(model, IDS)
    assert (out - ref).norm() / ref.norm() < 1e-4
    assert ctx.report["awq"]["groups_searched"] >= 0  # the row exists for every architecture


def test_llama_folds_into_the_norms_and_up_proj_and_leaves_grouped_query_o_proj_alone():
    model = _with_outlier_channels(tiny_model("llama"))  # 4 heads, 2 key/value heads
    before = copy.deepcopy(model)
    ctx = _ctx(model)
    Awq(format="nvfp4").run(model, ctx)
    folds = ctx.report["awq"]["folds"]
    assert folds["LlamaDecoderLayer:self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"] == "weight of input_layernorm"
    assert folds["LlamaDecoderLayer:mlp.gate_proj,mlp.up_proj"] == "weight of post_attention_layernorm"
    assert folds["LlamaDecoderLayer:mlp.down_proj"] == "rows of mlp.up_proj"  # gate_proj's rows fail the check
    assert folds["LlamaDecoderLayer:self_attn.o_proj"] == "none passed the check"
    l0, b0 = model.model.layers[0], before.model.layers[0]
    assert torch.equal(l0.self_attn.o_proj.weight, b0.self_attn.o_proj.weight)
    assert ctx.report["awq"]["groups_scaled"] > 0
    assert not torch.equal(l0.input_layernorm.weight, b0.input_layernorm.weight)


def test_multi_head_attention_folds_o_proj_into_v_proj_rows():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256)
    model = _with_outlier_channels(LlamaForCausalLM(cfg).eval())
    ref = _logits(model, IDS)
    ctx = _ctx(model)
    Awq(format="mxfp4").run(model, ctx)
    assert ctx.report["awq"]["folds"]["LlamaDecoderLayer:self_attn.o_proj"] == "rows of self_attn.v_proj"
    assert (_logits(model, IDS) - ref).norm() / ref.norm() < 1e-4


def test_gemma_norms_fold_through_their_one_plus_weight():
    model = _with_outlier_channels(tiny_model("gemma"))
    ctx = _ctx(model)
    Awq(format="nvfp4").run(model, ctx)
    folds = ctx.report["awq"]["folds"]
    assert folds["GemmaDecoderLayer:self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"] == "offset of input_layernorm"


def test_a_norm_that_also_feeds_fused_experts_is_left_alone():
    model = tiny_model("qwen2_moe")  # the post-attention norm feeds the shared expert and the fused 3-D experts
    ctx = _ctx(model)
    Awq(format="nvfp4").run(model, ctx)
    folds = ctx.report["awq"]["folds"]
    shared = "Qwen2MoeDecoderLayer:mlp.shared_expert.gate_proj,mlp.shared_expert.up_proj,mlp.shared_expert_gate"
    assert folds[shared] == "none passed the check"
    assert folds["Qwen2MoeDecoderLayer:mlp.shared_expert.down_proj"] == "rows of mlp.shared_expert.up_proj"
    assert folds["Qwen2MoeDecoderLayer:self_attn.q_proj,self_attn.k_proj,self_attn.v_proj"] == "weight of input_layernorm"


def test_folds_through_nonlinearities_are_refused():
    folds = {}
    for arch in ("olmo2", "gpt2", "opt"):
        ctx = _ctx(model := tiny_model(arch))
        Awq(format="nvfp4").run(model, ctx)
        folds[arch] = ctx.report["awq"]["folds"]
    assert folds["olmo2"]["Olmo2DecoderLayer:mlp.down_proj"] == "rows of mlp.up_proj"  # not gate_proj's (SiLU)
    assert folds["gpt2"]["GPT2Block:mlp.c_proj"] == "none passed the check"  # GELU
    assert folds["opt"]["OPTDecoderLayer:fc2"] == "rows of fc1"  # ReLU commutes with positive scales


@pytest.mark.parametrize("name,rotation", [("nvfp4", 0), ("mxfp4", 0), ("mxfp4", 32), ("int4", 0)])
def test_the_search_never_ends_worse_than_no_scaling_and_helps_with_outlier_channels(name, rotation):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g).to(torch.bfloat16)
    x = torch.randn(1024, 128, generator=g) * torch.where(torch.rand(128, generator=g) < 0.05, 20.0, 1.0)
    h = x.double().T @ x.double()
    awq = Awq(format=name, rotation=rotation)
    alpha, s, errs = awq.search([w], h)
    assert alpha is not None and errs[round(alpha * 20)] == min(errs.values()) <= errs[0]  # errs[0]: alpha 0, s = 1
    assert min(errs.values()) < 0.95 * errs[0]  # outlier input channels: scaling them up pays
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0, dtype=s.dtype))
    # the objective is the output error of round-to-nearest, computed by hand in float64 for the chosen scale
    # (the search evaluates it in fp32: equal up to fp32 rounding)
    fmt = get_format(name)
    ws = w.double() * s
    if rotation:
        from quantkit.passes.rotate.hadamard import rotate
        deq = rotate(fmt.dequantize(fmt.quantize(rotate(ws, rotation).to(w.dtype)), torch.float64), rotation,
                     inverse=True)
    else:
        deq = fmt.dequantize(fmt.quantize(ws.to(w.dtype)), torch.float64)
    d = deq / s - w.double()
    assert torch.isclose(torch.tensor(errs[round(alpha * 20)], dtype=torch.float64), (x.double() @ d.T).square().sum(),
                         rtol=1e-5)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_duo_scaling_keeps_no_scaling_as_a_candidate(name):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g).to(torch.bfloat16)
    h = torch.eye(64, dtype=torch.float64)  # flat inputs: scaling cannot help RTN, only hurt or tie
    awq = Awq(format=name, duo_scaling=True)
    alpha, s, errs = awq.search([w], h)
    none = awq._error([w], h, torch.ones(64, dtype=torch.float64))
    best = none if alpha is None else errs[round(alpha * 20)]
    assert best <= none and best <= min(errs.values())
    assert (alpha is None) == bool((s == 1).all())


def test_calibrated_activation_amax_follows_the_scaled_inputs():
    from quantkit.recipe import CalibConfig
    from quantkit.stream.loop import run_stage

    def ctx_for(model):
        ctx = _ctx(model)
        ctx.given_calib, ctx.calib_config = ctx.calib, CalibConfig(batch_size=4)
        return ctx

    model = _with_outlier_channels(tiny_model("llama"))
    ctx = ctx_for(model)
    run_stage([Calibrate(collect_stats=True), Awq(format="nvfp4")], ctx)
    assert ctx.report["awq"]["groups_scaled"] > 0
    fresh = ctx_for(model)  # the statistics of the scaled model, measured
    run_stage([Calibrate(collect_stats=True)], fresh)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert torch.allclose(ctx.stats["act_col_amax"][name], fresh.stats["act_col_amax"][name], rtol=1e-4)
        assert torch.allclose(ctx.stats["act_amax"][name], fresh.stats["act_amax"][name], rtol=1e-4)


@pytest.mark.parametrize("passes,message", [
    ([{"pass": "calibrate"}, {"pass": "gptq", "format": "nvfp4"}, {"pass": "awq", "format": "nvfp4"}],
     "before the passes that quantize"),
    ([{"pass": "calibrate", "collect_stats": False}, {"pass": "rotate", "online": True, "block_size": 32},
      {"pass": "awq", "format": "mxfp4", "rotation": 32}, {"pass": "gptq", "format": "mxfp4"}], "before rotate"),
    ([{"pass": "calibrate", "collect_stats": False}, {"pass": "awq", "format": "mxfp4"},
      {"pass": "rotate", "online": True, "block_size": 64}, {"pass": "gptq", "format": "mxfp4"}], "rotation: 64"),
    ([{"pass": "calibrate"}, {"pass": "awq", "format": "nvfp9"}], "unknown format"),
])
def test_recipes_in_an_order_awq_cannot_serve_are_refused(tmp_path, passes, message):
    import yaml

    from quantkit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "passes": passes}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_in_bf16_the_checks_leave_every_weight_bit_for_bit_and_find_the_same_folds(arch):
    # a check that tries Gemma's (1 + w) fold on a norm cannot undo it by dividing back in bf16; the weights are
    # restored from copies, so a failed candidate changes nothing and later groups still find their folds
    model = _with_outlier_channels(tiny_model(arch, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained norms' gains are not powers of two; (1 + w)/8 - 1 then rounds in bf16
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g).to(p.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _ctx(model)
    awq = Awq(format="nvfp4", grid=1)  # alpha 0 or 1: the folds are what is tested here
    awq.begin(ctx)
    from quantkit.stream.capture import capture
    from quantkit.stream.loop import BlockView

    blocks = list(ctx.arch.layers(model))
    cap = capture(model, blocks, ctx.calib_batches())
    blk = BlockView(0, f"{ctx.arch.layers_path}.0", blocks[0], model, cap.hidden, cap.calls[0])
    groups, ref = awq._groups(blk)
    folds = {tuple(g.names): awq._find_fold(blk, g, ref, {}) for g in groups}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert folds[("mlp.gate_proj", "mlp.up_proj")] is not None
    assert folds[("mlp.down_proj",)] == ("rows", "mlp.up_proj")


def test_each_group_searches_under_its_role_rotation(monkeypatch):
    """rotation_sizes: the group read by down_proj searches under its own block, the others under `rotation`."""
    seen: dict[int, int] = {}
    real = Awq.search

    def spy(self, weights, h, rms=None, rotation=None):
        seen[weights[0].shape[1]] = rotation  # the group's input width tells down_proj (128) from the rest (64)
        return real(self, weights, h, rms, rotation)

    monkeypatch.setattr(Awq, "search", spy)
    model = _with_outlier_channels(tiny_model("llama"))
    Awq(format="nvfp4", rotation=16, rotation_sizes={"down": 64}).run(model, _ctx(model))
    assert seen == {64: 16, 128: 64}


@pytest.mark.parametrize("name,rotation", [("nvfp4", 0), ("nvfp4", 32), ("mxfp4", 0)])
def test_the_coarse_to_fine_search_picks_the_full_grids_alpha_with_fewer_evaluations(name, rotation):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    x = torch.randn(1024, 128, generator=g) * torch.where(torch.rand(128, generator=g) < 0.05, 20.0, 1.0)
    h = x.double().T @ x.double()
    full = Awq(format=name, rotation=rotation, coarse=1).search([w], h)
    fast = Awq(format=name, rotation=rotation).search([w], h)
    assert sorted(full[2]) == list(range(21)) and len(fast[2]) <= 12  # 6 coarse points + the bracket around the best
    assert fast[0] == full[0] and torch.equal(fast[1], full[1])
    assert all(fast[2][k] == full[2][k] for k in fast[2])  # the same evaluations, fewer of them
