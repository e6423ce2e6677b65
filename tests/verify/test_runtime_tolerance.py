"""The runtime comparison's tolerance is measured on every run: transformers' own distance from the
fp32 forward of the same checkpoint (the bf16 noise floor), times NOISE_FACTOR. A correct
checkpoint passes; quantkit's runtime with one layer's scale off by x1.5 fails."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import tests.tiny_models as tiny
from quantkit.export import ct_reader
from quantkit.verify import verify_checkpoint
from quantkit.verify.fp32_reference import fp32_forward
from quantkit.verify.run_checks import NOISE_FACTOR
from tests.verify.factory import write_ct

# deeper and sharper than the default tiny Llama (8 layers, 128 wide, init std 0.1: max |logit| ~4),
# so bf16 rounding compounds through depth into a measurable floor (KL ~4e-4)
DEEP = "deep_llama"


@pytest.fixture(scope="module")
def deep_int8(tmp_path_factory):
    tiny.TINY_CONFIGS[DEEP] = lambda v: LlamaConfig(
        vocab_size=v, hidden_size=128, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
    try:
        return write_ct(tmp_path_factory.mktemp("deep") / "q", "int8", arch=DEEP)  # int8 weights, bf16
    finally:
        del tiny.TINY_CONFIGS[DEEP]


def test_fp32_forward_matches_a_widened_copy_and_leaves_the_model_bitwise_unchanged():
    torch.manual_seed(0)
    model = tiny.tiny_model("gemma", dtype=torch.bfloat16)  # gemma ties the head to the embedding
    ids = torch.randint(1, 256, (1, 12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode(), fp32_forward(model):
        hooked = model(ids).logits
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.inference_mode():
        widened = model.float()(ids).logits
    assert hooked.dtype == torch.float32 and torch.equal(hooked, widened)


def test_a_correct_deep_bf16_checkpoint_passes_with_its_measured_floor(deep_int8):
    r = verify_checkpoint(deep_int8)
    assert r.errors == [], r.errors
    run = r.info["run"]
    ref = run["fp32_reference"]
    assert ref["transformers_kl"] > 0 and ref["transformers_rel_max_diff"] > 0  # bf16 is not exact
    assert run["runtime_tolerance"]["kl_vs_fp32"] == pytest.approx(NOISE_FACTOR * ref["transformers_kl"])
    assert ref["quantkit_kl"] <= 1.5 * ref["transformers_kl"]  # as close to exact as transformers is


@pytest.mark.parametrize("layer", [0, 7])  # the first and the least sensitive (last) down_proj
def test_one_layer_scale_off_by_half_in_quantkits_runtime_is_an_error(deep_int8, monkeypatch, layer):
    load = ct_reader.load_ct_checkpoint

    def broken(path, dtype=torch.bfloat16):
        model = load(path, dtype=dtype)
        model.model.layers[layer].mlp.down_proj.weight_scale.mul_(1.5)
        return model

    monkeypatch.setattr(ct_reader, "load_ct_checkpoint", broken)
    r = verify_checkpoint(deep_int8)
    assert [f.check for f in r.errors] == ["run.runtime"]
    assert "from the fp32 forward" in r.errors[0].message
    ref = r.info["run"]["fp32_reference"]
    assert ref["quantkit_kl"] > 10 * ref["transformers_kl"]


def test_an_fp32_checkpoint_is_its_own_reference(tmp_path):
    r = verify_checkpoint(write_ct(tmp_path / "q", "int8", dtype=torch.float32))
    assert r.errors == []
    run = r.info["run"]
    assert run["fp32_reference"]["transformers_kl"] == 0.0
    assert run["runtime_tolerance"] == {"kl_vs_fp32": 1e-6, "rel_max_diff": 0.02}
