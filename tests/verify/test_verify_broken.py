"""verify fails, with the right message, on deliberately broken checkpoints (cheap checks)."""

import math

import pytest
import torch

from quantkit.verify import VerifyInputError, verify_checkpoint
from tests.verify.factory import edit_config, edit_tensors, write_ct

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"


def _errors(path, **kw):
    r = verify_checkpoint(path, cheap=True, **kw)
    return [(f.check, f.module, f.message) for f in r.errors], r


@pytest.fixture(scope="module")
def nvfp4_w4a4(tmp_path_factory):
    return write_ct(tmp_path_factory.mktemp("w4a4"), "nvfp4", "nvfp4")


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_clean_checkpoint_has_no_errors(nvfp4_w4a4):
    errors, r = _errors(nvfp4_w4a4)
    assert errors == [] and r.warnings == []
    assert r.info["schemes"]["group_0"]["scheme"] == "NVFP4"


def test_missing_input_scale(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_tensors(p, lambda t: t.pop(f"{Q}.input_global_scale"))
    errors, _ = _errors(p)
    assert errors == [("tensors.missing", Q, "static activation scheme without its input scale: "
                                             "NVFP4 needs input_global_scale, which is missing")]


def test_unequal_fused_global_scales(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_tensors(p, lambda t: t[f"{K}.weight_global_scale"].mul_(2))
    errors, _ = _errors(p)
    assert len(errors) == 1
    check, _, msg = errors[0]
    assert check == "tensors.fused_scale"
    assert msg.startswith("fused group model.layers.0.self_attn has unequal weight global scales")


def test_nan_global_scale(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)

    def nan(t):
        for m in (Q, K, "model.layers.0.self_attn.v_proj"):  # all three, so only the NaN check fires
            t[f"{m}.weight_global_scale"].fill_(math.nan)

    edit_tensors(p, nan)
    errors, _ = _errors(p)
    assert ("tensors.scale", Q, "weight_global_scale must be finite and positive: 1 NaN/Inf value(s)") in errors
    assert {e[0] for e in errors} == {"tensors.scale"}


def test_e4m3_nan_block_scale_code(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)

    def nan_code(t):
        s = t[f"{Q}.weight_scale"].view(torch.uint8)
        s[0, 0], s[1, 1] = 0x7F, 0xFF

    edit_tensors(p, nan_code)
    errors, _ = _errors(p)
    assert ("tensors.scale", Q, "weight_scale holds 2 E4M3 NaN code(s) (0x7F/0xFF)") in errors


def test_e8m0_255_exponent(tmp_path):
    p = write_ct(tmp_path / "mx", "mxfp4")
    edit_tensors(p, lambda t: t[f"{Q}.weight_scale"].view(-1)[:3].fill_(255))
    errors, _ = _errors(p)
    assert errors == [("tensors.scale", Q, "weight_scale holds 3 E8M0 NaN exponent(s) (255)")]


def test_group_size_that_does_not_divide(tmp_path):
    p = write_ct(tmp_path / "int4", "int4")  # group 32 on in_features 64 and 128

    def g48(c):
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 48

    edit_config(p, g48)
    errors, _ = _errors(p)
    assert ("shapes.group", Q, "group size 48 does not divide in_features 64") in errors


def test_quantized_lm_head(tmp_path):
    p = write_ct(tmp_path / "head", "int8", "int8", targets={"include": ["*"]})
    errors, _ = _errors(p)
    assert [e for e in errors if e[0] == "config.lm_head"] == [(
        "config.lm_head", "lm_head", "lm_head is quantized; vLLM's compressed-tensors loader does not load a quantized "
        "lm_head (add it to ignore, or pass --allow-quantized-lm-head if you meant it)")]
    assert _errors(p, allow_quantized_lm_head=True)[0] == []


def test_mixed_schemes_in_a_fused_group(tmp_path):
    p = write_ct(tmp_path / "mixed", "nvfp4", targets={"exclude": ["*k_proj"]})
    errors, _ = _errors(p)
    fused = [e for e in errors if e[0] == "config.fused"]
    assert len(fused) == 2  # both layers
    assert fused[0][2] == ("fused group model.layers.0.self_attn mixes schemes (q_proj: NVFP4A16, k_proj: unquantized, "
                           "v_proj: NVFP4A16); vLLM requires all members of a fused layer to use the same scheme")


def test_ignore_entry_that_matches_nothing(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_config(p, lambda c: c["quantization_config"]["ignore"].append("model.layers.7.mlp.gate"))
    errors, _ = _errors(p)
    assert errors == [("config.ignore", None, "ignore entry 'model.layers.7.mlp.gate' matches no module")]


def test_ignore_regex_matching_gate_proj_by_prefix_warns_and_conflicts(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_config(p, lambda c: c["quantization_config"]["ignore"].append("re:.*mlp.gate"))
    errors, r = _errors(p)
    assert [w.message for w in r.warnings] == [
        "ignore entry 're:.*mlp.gate' also matches 'model.layers.0.mlp.gate_proj' and 1 more by a prefix ending "
        "inside a name (re.match); end the pattern with '$' if that is unintended"]
    # and the two gate_proj layers it catches hold quantized tensors that engines would now load as dense
    assert {(e[0], e[1]) for e in errors} >= {("config.ignore", "model.layers.0.mlp.gate_proj")}


def test_scheme_vllm_does_not_accept(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)

    def asym_fp4(c):
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 8

    edit_config(p, asym_fp4)
    errors, _ = _errors(p)
    assert errors[0][0] == "config.scheme"
    assert "matches no scheme vLLM's compressed-tensors loader accepts" in errors[0][2]


def test_unknown_format_name(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)

    def fmt(c):
        c["quantization_config"]["config_groups"]["group_0"]["format"] = "nvfp4-packed"
        c["quantization_config"]["format"] = "nvfp4-packed"

    edit_config(p, fmt)
    errors, _ = _errors(p)
    assert [e[0] for e in errors] == ["config.format", "config.group"]
    assert errors[0][2].startswith("format 'nvfp4-packed' is not a compressed-tensors format; known: dense, ")
    assert errors[1][2].startswith("config group group_0 does not validate: format")


def test_kv_cache_scheme_engines_do_not_accept(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_config(p, lambda c: c["quantization_config"].update(
        kv_cache_scheme={"num_bits": 4, "type": "int", "strategy": "tensor", "symmetric": True, "dynamic": False}))
    errors, _ = _errors(p)
    assert errors[0][0] == "config.kv_cache" and "is not one engines accept" in errors[0][2]


def test_tied_config_with_separate_lm_head(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_config(p, lambda c: c.update(tie_word_embeddings=True))
    errors, _ = _errors(p)
    assert errors == [("config.lm_head", "lm_head", "config ties lm_head to the embeddings but the checkpoint stores "
                       "a separate lm_head (engines drop it, or untie and load it: the two disagree)")]


def test_untied_config_without_lm_head(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_tensors(p, lambda t: t.pop("lm_head.weight"))
    errors, _ = _errors(p)
    assert errors == [("config.lm_head", "lm_head", "embeddings are not tied but the checkpoint has no lm_head weight")]


def test_wrong_packed_shape(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_tensors(p, lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"][:, :16].contiguous()}))
    errors, _ = _errors(p)
    assert errors == [("tensors.shape", Q, "weight_packed has shape [64, 16], expected [64, 32]")]


def test_invalid_transform_config(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_config(p, lambda c: c["quantization_config"].update(
        transform_config={"config_groups": {"u": {"type": "hadamard", "apply": [{"targets": ["Linear"],
                                                                                  "location": "nowhere"}]}}}))
    errors, _ = _errors(p)
    assert errors[0][0] == "config.transform" and "does not validate" in errors[0][2]


def test_transform_matrix_of_the_wrong_size(nvfp4_w4a4, tmp_path):
    p = _copy(nvfp4_w4a4, tmp_path)
    edit_config(p, lambda c: c["quantization_config"].update(
        transform_config={"config_groups": {"u": {"type": "hadamard", "apply": [{"targets": [Q], "location": "input"}]}}}))
    edit_tensors(p, lambda t: t.update({f"{Q}.u_input.weight": torch.eye(32, dtype=torch.bfloat16)}))
    errors, _ = _errors(p)
    assert errors == [("tensors.transform", Q, "transform u_input is [32, 32], expected [64, 64]")]


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "is not a checkpoint directory"),
    (lambda p: p.mkdir(), "has no config.json; not a model checkpoint"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "has no quantization_config; not a quantized checkpoint"),
])
def test_bad_input_raises_verify_input_error(tmp_path, setup, message):
    p = tmp_path / "x"
    setup(p)
    with pytest.raises(VerifyInputError, match=message):
        verify_checkpoint(p)


def test_tensor_parallel_degrees_follow_heads_and_groups(tmp_path):
    # tiny Llama: 4 heads, 2 kv heads, hidden 64, intermediate 128
    _, r = _errors(write_ct(tmp_path / "int8", "int8"))
    assert r.info["tensor_parallel"]["degrees"] == [1, 2, 4]  # 4 query heads
    _, r = _errors(write_ct(tmp_path / "mx", "mxfp4"))
    tp = r.info["tensor_parallel"]
    assert tp["degrees"] == [1, 2]  # o_proj's 64 inputs hold two 32-element groups
    assert tp["limited_by"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
