"""GPTQ on fused MoE experts (issue 14): a Hessian per expert from the tokens routed to it,
round-to-nearest with a warning for an expert routed no token."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from typer.testing import CliRunner

from quantkit.formats import get_format
from quantkit.nn.expert_stats import expert_hessians
from quantkit.nn.qexperts import quantize_experts
from quantkit.passes.gptq.solver import gptq_quantize
from tests.test_moe_calibration import NEVER, _never_route
from tests.tiny_models import MOE_ARCHS, tiny_model


def _experts(arch):
    torch.manual_seed(0)
    return tiny_model(arch).model.layers[0].mlp.experts


def _routing_without(skip: int, tokens: int = 24, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g)
    idx = torch.stack([torch.tensor([e for e in torch.randperm(4, generator=g).tolist() if e != skip][:2])
                       for _ in range(tokens)])
    return x, idx, torch.rand(tokens, 2, generator=g)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_each_expert_hessian_is_from_its_routed_tokens_only(arch):
    experts = _experts(arch)
    x, idx, w = _routing_without(NEVER)
    with expert_hessians(experts) as found:
        experts(x, idx, w)
    hs = found[""]
    assert hs.tokens.tolist() == torch.bincount(idx.reshape(-1), minlength=4).tolist()
    assert hs.h["gate_up_proj"][NEVER] is None and hs.h["down_proj"][NEVER] is None
    for e in range(4):
        if e == NEVER:
            continue
        rows = x[(idx == e).any(-1)]
        assert torch.equal(hs.h["gate_up_proj"][e], rows.T @ rows)
        gate, up = F.linear(rows, experts.gate_up_proj[e]).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        assert torch.equal(hs.h["down_proj"][e], h.T @ h)


def test_gptq_solver_per_expert_equals_gptq_on_that_experts_matrix():
    """quantize_experts with the gptq solver gives, for every expert, exactly gptq_quantize of that
    expert's matrix with its own Hessian (and the expert's shared gate/up global scale)."""
    from quantkit.passes.gptq import Gptq
    from quantkit.passes.gptq.experts import _solver

    experts = _experts("mixtral")
    x, idx, w = _routing_without(NEVER)
    with expert_hessians(experts) as found:
        experts(x, idx, w)
    hs = found[""]
    fmt = get_format("nvfp4")
    weights = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    p = Gptq(format="nvfp4", block_size=16)
    losses = {}
    state = {"losses": losses, "refined": [0.0, 0.0, 0]}  # the pass's scratch entries the solver records into
    q = quantize_experts(experts, "nvfp4", "real", solver=_solver(p, fmt, "experts", hs, state))
    for param, W in weights.items():
        got = q.qweights(param)
        for e in range(4):
            gs = fmt.weight_global_scale(W[e])
            if e == NEVER:  # no Hessian: round-to-nearest
                want = fmt.quantize(W[e], global_scale=gs)
            else:
                want, _ = gptq_quantize(fmt, W[e], hs.h[param][e], gs, block_size=16, dampening=p.dampening)
                rtn = fmt.quantize(W[e], global_scale=gs)
                assert not torch.equal(got[e].codes, rtn.codes)  # GPTQ changed something
            assert torch.equal(got[e].codes, want.codes) and torch.equal(got[e].scale, want.scale)
    assert len(losses) == 2 * 3  # two parameters of three routed experts


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm2_tokenizer):
    out = {}
    for arch in MOE_ARCHS:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"gptq-{arch}")
        tiny_model(arch, vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16).save_pretrained(path)
        smollm2_tokenizer.save_pretrained(path)
        out[arch] = path
    return out


def _apply_gptq(src, out):
    from quantkit.cli import app

    result = CliRunner().invoke(app, ["apply", "nvfp4-w4a16-gptq", str(src), "-o", str(out), "--no-eval",
                                      "--set", "calib.seq_len=64", "--set", "calib.n_samples=2"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def _rtn_expert_tensors(src, arch):
    """Round-to-nearest NVFP4 of every expert, under the checkpoint's names."""
    from transformers import AutoModelForCausalLM

    from quantkit.arch import arch_info
    from quantkit.export.ct_experts import expert_tensors

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    info = arch_info(model)
    out = {}
    for layer in range(info.num_layers):
        for name, _ in info.experts(layer):
            out.update(expert_tensors(name, quantize_experts(model.get_submodule(name), "nvfp4", "real"),
                                      info.model_type))
    return out


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gptq_apply_quantizes_every_expert_from_its_hessian(tiny_dirs, tmp_path, arch):
    from quantkit.inspect import inspect_checkpoint

    out = tmp_path / "out"
    report = _apply_gptq(tiny_dirs[arch], out)
    assert inspect_checkpoint(out)["extra"]["experts"] == "4/4 quantized per layer (2 layers)"
    assert all(sum(c) == 2 * 64 * 2 for c in report["details"]["expert_tokens"].values())
    rtn = _rtn_expert_tensors(tiny_dirs[arch], arch)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed = [k for k in rtn if k.endswith("weight_packed")]
        assert all(k in f.keys() for k in rtn)
        differ = sum(not torch.equal(f.get_tensor(k), rtn[k]) for k in packed)
    assert differ == len(packed)  # every routed expert's codes moved off round-to-nearest


def test_gptq_expert_routed_to_nobody_falls_back_to_round_to_nearest(tiny_dirs, tmp_path, monkeypatch):
    _never_route(monkeypatch)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=rf"experts \[{NEVER}\] were routed no calibration token"):
        report = _apply_gptq(tiny_dirs["mixtral"], out)
    assert all(v == [NEVER] for v in report["details"]["gptq_rtn_experts"].values())
    rtn = _rtn_expert_tensors(tiny_dirs["mixtral"], "mixtral")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k, t in rtn.items():
            if f".experts.{NEVER}." in k:
                assert torch.equal(f.get_tensor(k), t), k  # bit-exact round-to-nearest
            elif k.endswith("weight_packed"):
                assert not torch.equal(f.get_tensor(k), t), k


def test_gptq_experts_stream_to_the_same_bytes_as_whole_model(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    from quantkit.cli import app

    written = {}
    for execution in ("whole", "streaming"):
        out = tmp_path / execution
        result = CliRunner().invoke(app, ["apply", "nvfp4-w4a16-gptq", str(tiny_dirs["qwen2_moe"]), "-o", str(out),
                                          "--no-eval", "--execution", execution,
                                          "--set", "calib.seq_len=64", "--set", "calib.n_samples=2"])
        assert result.exit_code == 0, result.output
        written[execution] = load_file(out / "model.safetensors")
    whole, streamed = written["whole"], written["streaming"]
    assert whole.keys() == streamed.keys() and any(".experts.3." in k for k in whole)
    assert all(torch.equal(whole[k], streamed[k]) for k in whole)
