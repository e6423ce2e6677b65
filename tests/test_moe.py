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
