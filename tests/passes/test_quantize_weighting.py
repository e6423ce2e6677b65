"""quantize pass: activation-weighted observers from the blocks' calibration inputs (issue 11)."""

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.formats import get_format
from quantkit.formats.observers import make_objective
from quantkit.formats.fp4 import blocks
from quantkit.nn.qlinear import QLinear
from quantkit.passes.quantize import Quantize
from quantkit.targets import Targets

LAYER0 = Targets(include=["model.layers.0.*"])  # layer 0's inputs do not depend on earlier quantization


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # uneven input channels, as real activations have, so weighting matters
        model.model.embed_tokens.weight.mul_(torch.linspace(0.1, 4.0, 128))
    return model


def _calib() -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _ctx(model) -> Context:
    return Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"), calib=_calib())


def _layer0_inputs(model) -> dict[str, torch.Tensor]:
    """Each layer-0 linear's calibration inputs [tokens, in], from the unquantized model."""
    xs: dict[str, list] = {}
    names = LAYER0.select(model, arch_info(model))
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: xs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).float())) for n in names]
    with torch.no_grad():
        model(input_ids=_calib(), use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def _quantized(fmt_name: str, observer: str, weighting: str) -> dict[str, QLinear]:
    model = _tiny_llama()
    Quantize(format=fmt_name, mode="fake", observer=observer, weighting=weighting, targets=LAYER0).run(model, _ctx(model))
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinear)}


def _block_errors(fmt, q: QLinear, w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """The weighted objective per block [out, nb], as the observer defines it."""
    e = blocks(q.dequantized_weight(torch.float32) - w.float(), fmt.block, fmt.name)
    return make_objective(importance, w.shape[1], fmt.block, 2.0)(e)


@pytest.mark.parametrize(("fmt_name", "observer"), [("nvfp4", "e4m3_local"), ("mxfp4", "mx_exp")])
@pytest.mark.parametrize("weighting", ["channel", "hessian"])
def test_weighted_choice_differs_and_never_has_higher_weighted_error(fmt_name, observer, weighting):
    fmt = get_format(fmt_name)
    ref = _tiny_llama()
    xs = _layer0_inputs(ref)
    plain = _quantized(fmt_name, observer, "none")
    weighted = _quantized(fmt_name, observer, weighting)
    assert set(plain) == set(weighted) == set(xs)
    differs = 0
    for n, x in xs.items():
        w = ref.get_submodule(n).weight.detach()
        imp = x.square().mean(0) if weighting == "channel" else x.T @ x  # what the pass must have used
        err_w = _block_errors(fmt, weighted[n], w, imp)
        err_p = _block_errors(fmt, plain[n], w, imp)
        assert (err_w <= err_p * (1 + 1e-5) + 1e-12).all(), n  # per block, on the weighted objective
        differs += int(not torch.equal(weighted[n].dequantized_weight(), plain[n].dequantized_weight()))
    assert differs > 0  # the weighting changed some linear's scales


def test_weighting_collects_inputs_and_reports_itself():
    model = _tiny_llama()
    p = Quantize(format="nvfp4", mode="fake", observer="e4m3_local", weighting="channel")
    assert p.requirements() >= {"calib"}
    ctx = _ctx(model)
    p.run(model, ctx)
    assert len([m for m in model.modules() if isinstance(m, QLinear)]) == 2 * 7
    assert ctx.report["quantize"]["observer"] == "e4m3_local" and ctx.report["quantize"]["weighting"] == "channel"


@pytest.mark.parametrize(("observer", "weighting", "match"), [
    ("minmax", "channel", "needs a searching observer"),
    ("mse", "hessian", "per channel only"),
])
def test_weighting_without_a_search_is_refused(observer, weighting, match):
    with pytest.raises(ValidationError, match=match):
        Quantize(format="nvfp4", observer=observer, weighting=weighting)


def test_weighting_statistics_come_from_the_already_quantized_previous_blocks(monkeypatch):
    import quantkit.passes.input_stats as input_stats

    seen: dict[str, torch.Tensor] = {}
    real = input_stats.input_second_moments

    def spy(blk, names, kind):
        out = real(blk, names, kind)
        seen.update(out)
        return out

    monkeypatch.setattr(input_stats, "input_second_moments", spy)
    model = _tiny_llama()
    Quantize(format="nvfp4", mode="fake", observer="e4m3_local", weighting="channel").run(model, _ctx(model))
    name = "model.layers.1.self_attn.q_proj"
    xs = []
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    with torch.no_grad():  # the finished model: layer 0 quantized, exactly what layer 1 was calibrated on
        model(input_ids=_calib(), use_cache=False)
    hook.remove()
    sequential = torch.cat(xs).square().mean(0)
    torch.testing.assert_close(seen[name], sequential, rtol=1e-5, atol=1e-7)
    original = _layer0_inputs_of(name)
    assert not torch.allclose(seen[name], original, rtol=1e-4)  # not the unquantized model's inputs


def _layer0_inputs_of(name: str) -> torch.Tensor:
    model = _tiny_llama()
    xs = []
    hook = model.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    with torch.no_grad():
        model(input_ids=_calib(), use_cache=False)
    hook.remove()
    return torch.cat(xs).square().mean(0)
