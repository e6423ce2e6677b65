"""Fused MoE experts (transformers 5: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])."""

import copy

import pytest
import torch

from quantkit.arch import arch_info
from quantkit.errors import FormatError
from quantkit.formats import get_format
from quantkit.nn.qexperts import QExperts, is_experts, quantize_experts
from quantkit.targets import set_module
from tests.tiny_models import MOE_ARCHS, tiny_model

FORMATS = ("nvfp4", "mxfp4", "int8", "int4")


def _experts(arch, dtype=torch.float32):
    torch.manual_seed(0)
    model = tiny_model(arch, dtype=dtype)
    name, _ = arch_info(model).experts(0)[0]
    return model, name, model.get_submodule(name)


def _routing(tokens=12, experts=4, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])  # [T, k] distinct
    w = torch.rand(tokens, k, generator=g)
    return x, idx, w


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["fake", "real"])
def test_forward_equals_original_module_with_dequantized_weights(arch, fmt, mode):
    _, _, experts = _experts(arch)
    reference = copy.deepcopy(experts)
    q = quantize_experts(experts, fmt, mode)
    with torch.no_grad():
        reference.gate_up_proj.copy_(q.dequantized("gate_up_proj"))
        reference.down_proj.copy_(q.dequantized("down_proj"))
    x, idx, w = _routing()
    assert torch.equal(q(x, idx, w), reference(x, idx, w))


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_expert_is_quantized_on_its_own(fmt):
    """Expert e's codes equal quantizing expert e's matrix alone: no scale crosses experts."""
    _, _, experts = _experts("mixtral")
    weights = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    q = quantize_experts(experts, fmt, "real")
    f = get_format(fmt)
    for param, w in weights.items():
        for e, qt in enumerate(q.qweights(param)):
            alone = f.quantize(w[e])
            assert torch.equal(qt.codes, alone.codes) and torch.equal(qt.scale, alone.scale)


def test_gate_and_up_share_one_nvfp4_global_scale_per_expert():
    _, _, experts = _experts("qwen2_moe")
    w = experts.gate_up_proj.detach().clone()  # [E, 2I, H]
    q = quantize_experts(experts, "nvfp4", "real")
    f = get_format("nvfp4")
    scales = [qt.global_scale for qt in q.qweights("gate_up_proj")]
    for e, gs in enumerate(scales):
        gate, up = w[e].chunk(2)
        assert torch.equal(gs, torch.minimum(f.weight_global_scale(gate), f.weight_global_scale(up)))
    assert len({float(s) for s in scales}) == len(scales)  # per expert, not one for the layer


def test_router_stays_high_precision_and_model_runs():
    model, name, experts = _experts("mixtral")
    set_module(model, name, quantize_experts(experts, "nvfp4", "fake"))
    assert isinstance(model.get_submodule(name), QExperts)
    assert model.get_submodule("model.layers.0.mlp.gate").weight.dtype == torch.float32
    logits = model(torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all()


def test_quantized_experts_are_still_discovered():
    model, name, experts = _experts("qwen2_moe")
    before = arch_info(model)
    set_module(model, name, quantize_experts(experts, "int8", "real"))
    after = arch_info(model)
    assert after.blocks == before.blocks and after.routers(0) == before.routers(0)
    assert not is_experts(model.get_submodule(name))


def test_activation_format_quantizes_each_experts_inputs():
    """With act_format the eager loop must equal the original forward when activations pass unchanged."""
    _, _, experts = _experts("mixtral")
    reference = copy.deepcopy(experts)
    q = quantize_experts(experts, "int8", "fake", act_format="nvfp4")
    with torch.no_grad():
        reference.gate_up_proj.copy_(q.dequantized("gate_up_proj"))
        reference.down_proj.copy_(q.dequantized("down_proj"))
    x, idx, w = _routing()
    out_q, out_ref = q(x, idx, w), reference(x, idx, w)
    assert not torch.equal(out_q, out_ref)  # the activations were quantized
    rel = (out_q - out_ref).norm() / out_ref.norm()
    assert 0 < rel < 0.2
    q.act_format = None
    assert torch.equal(q(x, idx, w), out_ref)


def test_activation_loop_equals_eager_experts_when_activations_pass_through(monkeypatch):
    """The per-expert loop itself matches transformers' forward when the activation quantizer is identity."""
    import quantkit.nn.qexperts as qe

    _, _, experts = _experts("mixtral")
    reference = copy.deepcopy(experts)
    q = quantize_experts(experts, "int8", "fake", act_format="int8")
    with torch.no_grad():
        reference.gate_up_proj.copy_(q.dequantized("gate_up_proj"))
        reference.down_proj.copy_(q.dequantized("down_proj"))

    class _Identity:
        def fake_activation(self, x, global_scale=None):
            return x

    real_get = qe.get_format
    monkeypatch.setattr(qe, "get_format", lambda n: _Identity() if n == "int8" and q.act_format else real_get(n))
    x, idx, w = _routing()
    reference.config._experts_implementation = "eager"  # grouped_mm sums in another order (~1e-9)
    assert torch.equal(q._eager_with_activations(x, idx, w), reference(x, idx, w))


def test_dtype_change_rebuilds_fake_cache_from_codes():
    _, _, experts = _experts("mixtral", dtype=torch.bfloat16)
    q = quantize_experts(experts, "nvfp4", "fake").float()
    assert torch.equal(q.inner.gate_up_proj, q.dequantized("gate_up_proj", torch.float32))


def test_not_experts_is_a_clear_error(tiny_llama):
    with pytest.raises(FormatError, match="is not a fused-experts module"):
        quantize_experts(tiny_llama.model.layers[0].mlp, "nvfp4")


# --- checkpoints: per-expert tensors that transformers 5 re-fuses on load -----------------------

def _quantized_moe(arch, fmt):
    from quantkit.nn.qlinear import quantize_linear
    from quantkit.targets import Targets

    torch.manual_seed(0)
    model = tiny_model(arch, dtype=torch.bfloat16)
    info = arch_info(model)
    for name in Targets().select(model, info):
        set_module(model, name, quantize_linear(model.get_submodule(name), fmt, mode="fake"))
    for layer in range(info.num_layers):
        for name, _ in info.experts(layer):
            set_module(model, name, quantize_experts(model.get_submodule(name), fmt, "fake"))
    return model, info


def _save_ct(model, info, out):
    """Test-local writer: the CT writer's tensors for everything but the experts, ct_experts' for them."""
    import json

    from safetensors.torch import save_file

    from quantkit.export.compressed_tensors import quantization_config, state_dict
    from quantkit.export.ct_experts import checkpoint_name, expert_tensors

    mt = info.model_type
    experts = {n: m for n, m in model.named_modules() if isinstance(m, QExperts)}
    tensors = {k: v for k, v in state_dict(model).items() if not any(k.startswith(n + ".") for n in experts)}
    for name, module in experts.items():
        tensors.update(expert_tensors(name, module, mt))
    tensors = {checkpoint_name(k, mt): v.contiguous().clone() for k, v in tensors.items()}
    qc = quantization_config(model)
    # one scheme: its "Linear" target covers the per-expert linears as well
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]
    qc["ignore"] = [checkpoint_name(n, mt) for n in qc["ignore"]]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, default=str))
    return tensors


CHECKPOINT_NAMES = {  # expert 0 of layer 0, as the original checkpoints (and vLLM's loaders) spell them
    "mixtral": ["model.layers.0.block_sparse_moe.experts.0.w1", "model.layers.0.block_sparse_moe.experts.0.w2",
                "model.layers.0.block_sparse_moe.experts.0.w3"],
    "qwen2_moe": ["model.layers.0.mlp.experts.0.down_proj", "model.layers.0.mlp.experts.0.gate_proj",
                  "model.layers.0.mlp.experts.0.up_proj"],
}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_names_follow_the_original_checkpoints(arch):
    from quantkit.export.ct_experts import expert_module_names

    model, info = _quantized_moe(arch, "int8")
    name, _ = info.experts(0)[0]
    names = expert_module_names(name, model.get_submodule(name), info.model_type)
    assert len(names) == 3 * 4
    assert sorted(n for n in names if ".experts.0." in n) == CHECKPOINT_NAMES[arch]


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_expert_tensors_decode_to_the_quantized_experts(fmt):
    """Reading each per-expert tensor set back (codec.from_ct) gives exactly that expert's rows."""
    from quantkit.export.compressed_tensors import codecs, scheme_dict
    from quantkit.export.ct_experts import expert_scheme, expert_tensors

    model, info = _quantized_moe("qwen2_moe", fmt)
    name, _ = info.experts(0)[0]
    module = model.get_submodule(name)
    tensors = expert_tensors(name, module, info.model_type)
    codec, f = codecs()[fmt], get_format(fmt)
    gate_up, down = module.dequantized("gate_up_proj"), module.dequantized("down_proj")  # [E, 2I, H], [E, H, I]
    inter = down.shape[2]
    for e in range(4):
        for proj, want in (("gate_proj", gate_up[e, :inter]), ("up_proj", gate_up[e, inter:]), ("down_proj", down[e])):
            prefix = f"{name}.{e}.{proj}."
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            qt = codec.from_ct(part, tuple(want.shape))
            assert torch.equal(f.dequantize(qt), want), (e, proj)
    linear = next(m for m in model.modules() if type(m).__name__ == "QLinear")
    assert expert_scheme(module) == scheme_dict(linear)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("fmt", [
    "int8", "int4", "mxfp4",
    pytest.param("nvfp4", marks=pytest.mark.xfail(
        strict=True, reason="transformers drops weight_global_scale when it re-fuses NVFP4 experts "
                            "(huggingface/transformers#48371, fix in PR #48372)")),
])
def test_transformers_reloads_the_checkpoint_with_equal_logits(arch, fmt, tmp_path):
    """Stated tolerance: bitwise equal logits (bf16), in-memory fake-quant model vs transformers' reload."""
    from transformers import AutoModelForCausalLM

    model, info = _quantized_moe(arch, fmt)
    _save_ct(model, info, tmp_path)
    loaded, report = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, output_loading_info=True)
    assert not report["missing_keys"] and not report["unexpected_keys"]
    ids = torch.arange(48)[None] % 256
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_select_experts_follows_targets_semantics():
    from quantkit.nn.qexperts import select_experts
    from quantkit.targets import Targets

    model, _, _ = _experts("mixtral")
    info = arch_info(model)
    both = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert select_experts(Targets(), model, info) == both
    assert select_experts(Targets(roles=["q", "k"]), model, info) == []
    assert select_experts(Targets(roles=["experts"], layers=[1]), model, info) == both[1:]
    assert select_experts(Targets(exclude=["*.experts"]), model, info) == []
    assert select_experts(Targets(include=["model.layers.0.*"]), model, info) == both[:1]


def test_quantize_named_experts_counts_bytes_and_skips_done_modules():
    from quantkit.nn.qexperts import quantize_named_experts, select_experts
    from quantkit.targets import Targets

    model, _, _ = _experts("mixtral", dtype=torch.bfloat16)
    names = select_experts(Targets(), model, arch_info(model))
    before, after = quantize_named_experts(model, names, "nvfp4", "real")
    # bf16 [4, 256, 64] + [4, 64, 128] per layer; NVFP4: half a byte per weight + one E4M3 scale per 16
    weights = 2 * 4 * (256 * 64 + 64 * 128)
    assert before == weights * 2
    assert after == weights // 2 + weights // 16 + 2 * 2 * 4 * 4  # + fp32 global scale per expert and weight
    assert select_experts(Targets(), model, arch_info(model)) == []


# --- calibration that reaches every expert -----------------------------------------------------

def _never_routed(tokens=12, skip=3, seed=2):
    """Routing over experts {0, 1, 2} only: expert `skip` is sent no token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g)
    idx = torch.stack([torch.tensor([e for e in torch.randperm(4, generator=g).tolist() if e != skip][:2])
                       for _ in range(tokens)])
    return x, idx, torch.rand(tokens, 2, generator=g)


def test_all_experts_statistics_reach_every_expert_while_real_routing_decides_the_output():
    from quantkit.nn.expert_stats import expert_statistics

    _, name, experts = _experts("mixtral")
    x, idx, w = _never_routed()
    plain = experts(x, idx, w)
    with expert_statistics(experts, all_experts=True, prefix=name) as found:
        out = experts(x, idx, w)
    assert torch.equal(out, plain)
    stats = found[name]
    assert stats.tokens.tolist() == torch.bincount(idx.reshape(-1), minlength=4).tolist() and stats.tokens[3] == 0
    assert (stats.amax["gate_up_proj"] == x.abs().max()).all()  # every expert saw all tokens
    assert (stats.amax["down_proj"] > 0).all()
    # the down input of expert 3 over all tokens, computed directly
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[3]).chunk(2, dim=-1)
    assert torch.equal(stats.amax["down_proj"][3], (experts.act_fn(gate) * up).abs().max())


@pytest.mark.parametrize("all_experts", [False, True])
def test_expert_routed_to_nobody_still_gets_finite_positive_scales(all_experts):
    from quantkit.nn.expert_stats import expert_statistics, input_amax

    _, name, experts = _experts("qwen2_moe")
    x, idx, w = _never_routed()
    with expert_statistics(experts, all_experts=all_experts) as found:
        experts(x, idx, w)
    stats = found[""]
    if all_experts:
        amax = input_amax(stats, experts)
    else:
        assert stats.amax["down_proj"][3] == 0  # really unseen
        with pytest.warns(UserWarning, match=r"experts \[3\] saw no calibration input"):
            amax = input_amax(stats, experts)
    for a in amax.values():
        assert torch.isfinite(a).all() and (a > 0).all()
    scales = get_format("nvfp4").activation_global_scale(amax["down_proj"])
    assert torch.isfinite(scales).all() and (scales > 0).all()
    if not all_experts:  # observed experts keep their observed amax
        assert torch.equal(amax["down_proj"][:3], stats.amax["down_proj"][:3])


def test_weight_derived_bound_when_no_expert_saw_anything():
    from quantkit.nn.expert_stats import ExpertStats, input_amax

    _, _, experts = _experts("mixtral")
    with pytest.warns(UserWarning):
        amax = input_amax(ExpertStats(4), experts)
    assert (amax["gate_up_proj"] == 1.0).all()
    g, u = experts.gate_up_proj[0].abs().chunk(2)
    assert torch.allclose(amax["down_proj"][0], (g.sum(1) * u.sum(1)).max())


def test_calibrated_static_scales_feed_quantized_experts():
    """W4A4 experts: per-expert NVFP4 input global scales from all-expert statistics, used in forward."""
    from quantkit.nn.expert_stats import expert_statistics, input_global_scales

    _, _, experts = _experts("mixtral")
    x, idx, w = _never_routed()
    with expert_statistics(experts) as found:
        experts(x, idx, w)
    scales = input_global_scales(found[""], experts, "nvfp4")
    assert set(scales) == {"gate_up_proj", "down_proj"} and all(s.shape == (4,) for s in scales.values())
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scales.values())
    assert input_global_scales(found[""], experts, "int8") is None  # dynamic per-token: nothing static
    dynamic = quantize_experts(copy.deepcopy(experts), "nvfp4", "fake", act_format="nvfp4")
    static = quantize_experts(experts, "nvfp4", "fake", act_format="nvfp4", input_global_scales=scales)
    assert torch.equal(static.down_proj_input_global_scale, scales["down_proj"])
    out_static, out_dynamic = static(x, idx, w), dynamic(x, idx, w)
    assert torch.isfinite(out_static).all()
    assert not torch.equal(out_static, out_dynamic)  # the static scales are the ones applied


# --- end to end: `quantkit apply` on a tiny MoE, reloaded by transformers ---------------------------

@pytest.fixture(scope="module", params=MOE_ARCHS)
def tiny_moe_dir(request, tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    model = tiny_model(request.param, vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return request.param, path


@pytest.mark.parametrize(("recipe", "fmt"), [("int8-w8a16", "int8"), ("mxfp4-w4a16", "mxfp4")])
def test_apply_quantizes_every_expert_and_transformers_reloads_it(tiny_moe_dir, recipe, fmt, tmp_path):
    """Stated tolerance: the reloaded checkpoint's logits are bitwise equal (bf16) to the original
    model quantized in memory the same way (linears and every expert, fake mode)."""
    from typer.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from quantkit.cli import app
    from quantkit.nn.qlinear import quantize_linear
    from quantkit.targets import Targets

    arch, src = tiny_moe_dir
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["apply", recipe, str(src), "-o", str(out), "--no-eval",
                                      "--set", "calib.seq_len=64", "--set", "calib.n_samples=2"])
    assert result.exit_code == 0, result.output
    loaded, report = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not report["missing_keys"] and not report["unexpected_keys"]

    expected = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    info = arch_info(expected)
    for name in Targets().select(expected, info):
        set_module(expected, name, quantize_linear(expected.get_submodule(name), fmt, mode="fake"))
    for layer in range(info.num_layers):
        for name, _ in info.experts(layer):
            set_module(expected, name, quantize_experts(expected.get_submodule(name), fmt, "fake"))
    ids = torch.arange(40)[None] * 7
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_llama4_experts_stored_in_out_are_read_transposed():
    """Llama-4 keeps experts as [E, in, out] without saying so; shapes decide the orientation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama4_text", hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               vocab_size=256, num_local_experts=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    info = arch_info(model)
    name, layout = info.experts(0)[0]
    assert layout.transposed and layout.params == {"gate_up": "gate_up_proj", "down": "down_proj"}
    experts = model.get_submodule(name)
    reference = copy.deepcopy(experts)
    q = quantize_experts(experts, "mxfp4", "real")
    with torch.no_grad():
        reference.gate_up_proj.copy_(q.dequantized("gate_up_proj"))
        reference.down_proj.copy_(q.dequantized("down_proj"))
    x = torch.randn(4 * 3, 64)  # Llama-4's experts take tokens already sorted per expert
    assert torch.equal(q(x), reference(x))
