"""The masa pass on a tiny random Llama: budgets, exactness, closeness, calibration use."""

import math

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.passes.masa import fit as mm
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.errors import RecipeError
from quantkit.nn.dict_linear import DictLinear
from quantkit.passes.base import PASSES
from quantkit.passes.masa import Masa
from quantkit.passes.masa.stats import collect_input_grams

N_LAYERS = 4


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _correlated_model(spread=0.1):
    """Attention weights = one shared matrix per role + a small per-layer part, as MASA assumes."""
    model = _model()
    with torch.no_grad():
        for role in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base = getattr(model.model.layers[0].self_attn, role).weight.clone()
            for layer in model.model.layers:
                w = getattr(layer.self_attn, role).weight
                w.copy_(base + spread * w)
    return model


def _ctx(model, n=4, seq=32):
    calib = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))
    return Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"), calib=calib)


def _logits(model, ctx):
    with torch.no_grad():
        return model(input_ids=ctx.calib).logits


def test_pass_is_registered():
    assert PASSES.get("masa") is Masa


def test_all_attention_linears_become_dict_linears():
    model = _model()
    Masa(ratio=0.2).run(model, _ctx(model))
    n = sum(isinstance(m, DictLinear) for m in model.modules())
    assert n == 4 * N_LAYERS


def test_atoms_equal_layers_is_lossless():
    model = _model()
    ctx = _ctx(model)
    ref = _logits(model, ctx)
    Masa(ratio=None, atoms=N_LAYERS).run(model, ctx)
    assert torch.allclose(_logits(model, ctx), ref, atol=1e-4)


def test_reduction_meets_ratio():
    model = _model()
    ctx = _ctx(model)
    Masa(ratio=0.5).run(model, ctx)
    assert ctx.report["masa"]["reduction"] >= 0.5


def test_residual_budget_counts_toward_ratio():
    model = _model()
    ctx = _ctx(model)
    Masa(ratio=0.3, residual_share=0.3, refit=True).run(model, ctx)
    rep = ctx.report["masa"]
    assert rep["reduction"] >= 0.3 and sum(rep["residual_rank_total"].values()) > 0


def test_unshared_roles_count_as_kept():
    model = _model()
    ctx = _ctx(model)
    Masa(roles=["q", "k", "v"], ratio=0.3).run(model, ctx)
    assert ctx.report["masa"]["reduction"] >= 0.3
    assert not isinstance(model.model.layers[0].self_attn.o_proj, DictLinear)


def test_output_stays_close_when_layers_share_structure():
    model = _correlated_model()
    ctx = _ctx(model)
    ref = _logits(model, ctx)
    Masa(ratio=0.2, residual_share=0.3, refit=True).run(model, ctx)
    out = _logits(model, ctx)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_refit_never_increases_any_layers_whitened_error():
    ref = _model()
    ctx = _ctx(ref)
    grams = collect_input_grams(ref, ctx, ctx.arch, ["q", "k", "v", "o"], 1e-2)
    errors = []
    for refit in (False, True):
        model = _model()
        Masa(ratio=0.3, refit=refit).run(model, _ctx(model))
        errors.append({
            key: float(mm.whitened_error(
                model.get_submodule(ctx.arch.module_name(*key)).dense_weight(torch.float64)
                - ref.get_submodule(ctx.arch.module_name(*key)).weight.detach().double(), h))
            for key, h in grams.items()
        })
    assert all(errors[1][k] <= errors[0][k] * (1 + 1e-6) for k in grams)


def test_kl_grouping_makes_requested_groups():
    model = _model()
    ctx = _ctx(model)
    Masa(ratio=0.2, grouping="kl", n_groups=2).run(model, ctx)
    groups = ctx.report["masa"]["groups"]
    assert len(groups) == 2 and sorted(sum(groups, [])) == list(range(N_LAYERS))
    assert len(ctx.report["masa"]["kl_boundaries"]) == N_LAYERS - 1


def test_calibration_required_only_when_used():
    assert Masa(ratio=0.2).requirements() == frozenset()
    assert "calib" in Masa(ratio=0.2, refit=True).requirements()
    assert "calib" in Masa(ratio=0.2, grouping="kl").requirements()


def test_budget_is_required():
    with pytest.raises(ValidationError):
        Masa(ratio=None)


def test_too_many_atoms_for_ratio_is_an_error():
    model = _model()
    with pytest.raises(RecipeError, match="over the budget"):
        Masa(ratio=0.5, atoms=N_LAYERS).run(model, _ctx(model))


def test_atoms_stored_once_in_state_dict():
    model = _model()
    Masa(ratio=0.5).run(model, _ctx(model))
    keys = [k for k in model.state_dict() if k.endswith("atoms")]
    assert keys and all(k.startswith("masa_banks.") for k in keys)


def test_checkpoint_round_trip_through_from_pretrained(tmp_path):
    import quantkit  # noqa: F401  registers the quantkit layout with transformers
    from transformers import AutoModelForCausalLM

    from quantkit.export.quantkit_layout import save_quantkit_checkpoint

    model = _model()
    ctx = _ctx(model)
    Masa(ratio=0.3, residual_share=0.3, refit=True).run(model, ctx)
    expect = _logits(model, ctx)
    save_quantkit_checkpoint(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, DictLinear)
    assert torch.allclose(_logits(loaded, ctx), expect, atol=1e-5)


def test_param_counts_from_saved_config_match_the_pass_report(tmp_path):
    from transformers import AutoConfig

    from quantkit.export.masa_layout import masa_param_counts
    from quantkit.export.quantkit_layout import save_quantkit_checkpoint

    model = _model()
    ctx = _ctx(model)
    Masa(ratio=0.3, residual_share=0.3, refit=True).run(model, ctx)
    save_quantkit_checkpoint(model, tmp_path)
    counts = masa_param_counts(AutoConfig.from_pretrained(tmp_path))
    assert counts == masa_param_counts(model)
    assert counts["stored"] == ctx.report["masa"]["stored_params"]  # all four roles shared: no dense rest


def test_checkpoint_stores_fewer_attention_bytes(tmp_path):
    from safetensors import safe_open

    from quantkit.export.quantkit_layout import save_quantkit_checkpoint

    model = _model()
    dense = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n)
    Masa(ratio=0.5).run(model, _ctx(model))
    save_quantkit_checkpoint(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                     if "self_attn" in k or k.startswith("masa_banks"))
    assert stored <= 0.5 * dense
