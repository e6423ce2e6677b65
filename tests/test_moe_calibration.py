"""Calibration reaches every MoE expert (issue 14, item 3): the calibrate pass's
`moe_calibrate_all_experts`, per-expert token counts in the report, finite input scales for an
expert the routing never picks."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.tiny_models import tiny_model

NEVER = 3  # the expert the patched router never picks


def _never_route(monkeypatch):
    """Mixtral's router with expert NEVER's logit at -inf: the real routing sends it no token."""
    from transformers.models.mixtral import modeling_mixtral as mm

    original = mm.MixtralTopKRouter.forward

    def forward(self, hidden_states):
        w = self.weight.data.clone()
        self.weight.data[NEVER] = 0
        try:
            logits, _, _ = original(self, hidden_states)
        finally:
            self.weight.data = w
        logits = logits.clone()
        logits[:, NEVER] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), idx

    monkeypatch.setattr(mm.MixtralTopKRouter, "forward", forward)


def test_all_expert_statistics_differ_from_routed_only_ones():
    from quantkit.nn.expert_stats import expert_statistics

    torch.manual_seed(0)
    experts = tiny_model("mixtral").model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(16)])
    w = torch.rand(16, 2, generator=g)
    found = {}
    for all_experts in (True, False):
        with expert_statistics(experts, all_experts=all_experts) as f:
            experts(x, idx, w)
        found[all_experts] = f[""]
    every, routed = found[True], found[False]
    assert torch.equal(every.tokens, routed.tokens)  # counts are the real routing's either way
    for param in ("gate_up_proj", "down_proj"):
        # a superset of the tokens (down's input is a matmul output: batch size changes its rounding)
        assert (every.amax[param] >= routed.amax[param] * (1 - 1e-5)).all()
        assert not torch.equal(every.amax[param], routed.amax[param])
    # routed-only: expert e's input amax is over exactly the tokens routed to e
    for e in range(4):
        rows = x[(idx == e).any(-1)]
        assert torch.equal(routed.amax["gate_up_proj"][e], rows.abs().max())


@pytest.fixture(scope="module")
def tiny_mixtral_dir(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    model = tiny_model("mixtral", vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny-mixtral-calib")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _apply(src, out, *extra):
    from typer.testing import CliRunner

    from quantkit.cli import app

    result = CliRunner().invoke(app, ["apply", "nvfp4-w4a4", str(src), "-o", str(out), "--no-eval",
                                      "--set", "calib.seq_len=64", "--set", "calib.n_samples=2", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def _input_scales(out, expert: int) -> dict[str, float]:
    """Checkpoint name with the expert index dropped -> that expert's static input global scale."""
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k.replace(f".experts.{expert}.", ".experts.*."): float(f.get_tensor(k)) for k in f.keys()
                if f".experts.{expert}." in k and k.endswith("input_global_scale")}


@pytest.mark.parametrize("all_experts", [True, False])
def test_expert_routed_to_nobody_gets_finite_positive_input_scales_in_the_checkpoint(
        tiny_mixtral_dir, tmp_path, monkeypatch, all_experts):
    _never_route(monkeypatch)
    out = tmp_path / "out"
    extra = () if all_experts else ("--set", "passes.0.moe_calibrate_all_experts=false")
    if all_experts:
        report = _apply(tiny_mixtral_dir, out, *extra)
    else:  # routed-only statistics: the never-routed expert falls back to weight-derived scales
        with pytest.warns(UserWarning, match=rf"experts \[{NEVER}\] saw no calibration input"):
            report = _apply(tiny_mixtral_dir, out, *extra)
    tokens = report["details"]["expert_tokens"]
    assert len(tokens) == 2  # one row per MoE layer
    for counts in tokens.values():
        assert counts[NEVER] == 0 and sum(counts) == 2 * 64 * 2  # every token picks top-2 experts
    calib = report["details"]["calibrate"]
    assert calib["moe_calibrate_all_experts"] is all_experts and calib["experts_without_tokens"] == 2
    scales = _input_scales(out, NEVER)
    assert len(scales) == 2 * 3  # w1, w2, w3 per layer
    assert all(torch.isfinite(torch.tensor(s)) and s > 0 for s in scales.values())
    seen = _input_scales(out, 0)
    gate_up = [k for k in scales if k.split(".")[-2] in ("w1", "w3")]
    assert len(gate_up) == 4
    if all_experts:
        # gate/up read the hidden states, the same tensor for every expert: with every token sent
        # through every expert, the never-routed expert's scale is measured, equal to the others'
        assert all(scales[k] == seen[k] for k in gate_up)


# --- all-expert statistics only when a later pass reads them (provides/requires) ---------------------


def test_only_a_static_activation_pass_that_may_take_experts_requires_expert_statistics():
    from quantkit.passes.quantize import Quantize
    from quantkit.targets import Targets

    assert "expert_stats" in Quantize(format="nvfp4", act_format="nvfp4").requirements()
    assert "expert_stats" in Quantize(format="nvfp4", act_format="nvfp4",
                                      targets=Targets(roles=["experts"])).requirements()
    attention = Quantize(format="nvfp4", act_format="nvfp4", targets=Targets(roles=["q", "k", "v", "o"]))
    assert attention.requirements() == {"act_stats"}
    assert "expert_stats" not in Quantize(format="nvfp4").requirements()  # weight-only
    assert "expert_stats" not in Quantize(format="mxfp4", act_format="mxfp4").requirements()  # dynamic


@pytest.mark.parametrize(("overrides", "gathers"), [
    ([], True),  # W4A4 on every expert: the calibrate pass gathers them once, quantize reads them
    (["passes.1.targets.roles=[q, k, v, o]"], False),  # static activations on attention only
    (["passes.1.act_format=null", "passes.0.collect_stats=true"], False),  # linear statistics, no static pass
])
def test_calibrate_gathers_expert_statistics_only_when_a_later_pass_reads_them(
        tiny_mixtral_dir, monkeypatch, overrides, gathers):
    import quantkit.nn.expert_stats as es
    from quantkit.api import apply
    from quantkit.recipe import load_recipe

    original, walked = es.expert_statistics, []

    def counting(root, *args, **kwargs):
        walked.append(kwargs.get("prefix", args[1] if len(args) > 1 else ""))
        return original(root, *args, **kwargs)

    monkeypatch.setattr(es, "expert_statistics", counting)
    recipe = load_recipe("nvfp4-w4a4", ["calib.seq_len=32", "calib.n_samples=2", "eval.enabled=false", *overrides])
    report = apply(recipe, str(tiny_mixtral_dir), output=None, execution="whole")
    assert walked == (["model.layers.0", "model.layers.1"] if gathers else [])
    calib = report.details["calibrate"]
    assert calib["linears"] > 0  # the linears' statistics are gathered either way
    assert ("experts_modules" in calib) is gathers
    assert ("expert_tokens" in report.details) is gathers
