"""Sensitivity on MoE models (issue 14): components `experts` and `router`; plain progress lines."""

import copy
import io

import pytest
import torch

from quantkit.analysis import sweep as S
from quantkit.analysis.sensitivity import _progress, moe_units, plan_runs, run_sensitivity
from quantkit.arch import arch_info
from quantkit.formats import get_format
from quantkit.nn.qexperts import quantize_experts
from quantkit.targets import Targets, set_module
from tests.tiny_models import MOE_ARCHS, tiny_model

VOCAB = 256


def _moe(arch: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # larger than the 0.02 init, so quantization visibly moves the logits
    return model.to(dtype)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_plan_has_experts_and_router_components(arch):
    model = _moe(arch)
    info = arch_info(model)
    names = Targets().select(model, info)
    moe = moe_units(model, info)
    runs = {r.id: r for r in plan_runs(info, names, ("component", "block", "grid"), moe)}
    experts = tuple(f"model.layers.{b}.mlp.experts" for b in range(2))
    routers = {"mixtral": ("model.layers.{b}.mlp.gate",),
               "qwen2_moe": ("model.layers.{b}.mlp.gate", "model.layers.{b}.mlp.shared_expert_gate")}[arch]
    assert runs["component:experts"].modules == experts
    assert set(runs["component:router"].modules) == {r.format(b=b) for b in range(2) for r in routers}
    # experts count wherever a default recipe quantizes them; routers only in their own runs
    assert set(experts) <= set(runs["all"].modules) and not set(runs["component:router"].modules) & set(runs["all"].modules)
    assert "model.layers.1.mlp.experts" in runs["block:1"].modules
    assert not any(".gate" in n and "gate_proj" not in n for n in runs["block:1"].modules if "shared_expert." not in n)
    assert runs["grid:router:0"].modules and all(".layers.0." in n for n in runs["grid:router:0"].modules)
    # Targets' semantics: a role list without them leaves both out
    assert moe_units(model, info, Targets(roles=["q"])) == {}


def test_experts_run_equals_the_model_with_fake_quantized_experts(tokens):
    """Swapping the sweep's expert weights gives exactly the logits of QExperts (fake) in place."""
    model = _moe("mixtral")
    info = arch_info(model)
    moe = moe_units(model, info)
    sw = S.Sweep(model, info, get_format("nvfp4"), tokens, Targets().select(model, info), act_quant=False, moe=moe)
    name = "model.layers.1.mlp.experts"
    expected = copy.deepcopy(model)
    set_module(expected, name, quantize_experts(expected.get_submodule(name), "nvfp4", "fake"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(tokens).logits
        with sw.quantized([name]):
            changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
            got = model(tokens).logits
        want = expected(tokens).logits
    assert changed == {f"{name}.gate_up_proj", f"{name}.down_proj"}
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_sweep_measures_experts_and_router_and_restores_weights(arch, tokens, capsys):
    model = _moe(arch, torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = run_sensitivity(model, None, format="nvfp4", tokens=tokens, isolation="component", progress=True)
    scores = res.component_scores()
    assert {"experts", "router"} <= set(res.components)
    assert scores["experts"] > 0 and scores["router"] > 0  # quantizing either moves the output
    assert res.run("component:experts").n_modules == 2
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[quantkit] sensitivity:")]
    total = 1 + len(res.components)  # ALL, then one run per component
    assert lines[0] == f"[quantkit] sensitivity: started (0/{total} runs)"
    assert lines[1].startswith(f"[quantkit] sensitivity: 1/{total} all, elapsed ") and ", eta " in lines[1]
    assert lines[-1].startswith(f"[quantkit] sensitivity: done {total}/{total} in ")


def test_plain_progress_lines_count_runs_and_estimate_the_rest():
    out = io.StringIO()
    with _progress(True, 2, stream=out) as advance:
        advance("all")
        advance("component:q")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[quantkit] sensitivity: started (0/2 runs)"
    assert lines[1].startswith("[quantkit] sensitivity: 1/2 all, elapsed 0:0") and ", eta 0:0" in lines[1]
    assert lines[2].startswith("[quantkit] sensitivity: 2/2 component:q, elapsed") and "eta" not in lines[2]
    assert lines[3].startswith("[quantkit] sensitivity: done 2/2 in 0:0")


def test_reports_and_budget_on_an_moe(tokens, tmp_path):
    """The full sweep (ALL, component, block; reports, budget over the linears) runs on an MoE."""
    model = _moe("qwen2_moe")
    res = run_sensitivity(model, None, format="nvfp4", tokens=tokens, out_dir=tmp_path, budget_bits=5.0,
                          model_name="tiny-moe")
    assert res.run("all").n_modules == len(Targets().select(model, arch_info(model))) + 2  # + 2 experts modules
    assert {p.name for p in tmp_path.iterdir()} >= {"sensitivity.json", "sensitivity.md"}
    assert "experts" in (tmp_path / "sensitivity.md").read_text()
    choice = res.budget["choice"]  # --budget-bits assigns formats to the linears only (docs/architectures.md)
    assert choice and not any(".experts" in n or n.endswith(".gate") for n in choice)
