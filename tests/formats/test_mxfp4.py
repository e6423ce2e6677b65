"""MXFP4: compressed-tensors and torchao bit-exactness, exponent rules, edge cases."""

import pytest
import torch
from fp4_reference import HAS_TORCHAO, ct_mxfp4, edge_weight, torchao_mxfp4

from quantkit.errors import FormatError
from quantkit.formats import get_format
from quantkit.formats.scales import mx_exponent

RULES = ["floor", "even", "rceil", "ceil"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_even_rule_equals_compressed_tensors_on_edge_weights(dtype, seed):
    w = edge_weight(dtype, seed=seed)
    ref, q = ct_mxfp4(w), get_format("mxfp4_even").quantize(w)
    assert torch.equal(ref["weight_packed"], q.codes)
    assert torch.equal(ref["weight_scale"], q.scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1.0, 1e30])
def test_even_rule_equals_compressed_tensors_on_random_weights(dtype, magnitude):
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * magnitude).to(dtype)
    ref, q = ct_mxfp4(w), get_format("mxfp4_even").quantize(w)
    assert torch.equal(ref["weight_packed"], q.codes)
    assert torch.equal(ref["weight_scale"], q.scale)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not importable")
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_rule_equals_torchao_to_mx(rule, dtype):
    # torchao divides an all-tiny block by 2**-126 instead of its stored 2**-127, so exponent-0
    # blocks are left out of the weight (they are covered against compressed-tensors above)
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(7)) * 0.05).to(dtype)
    w[0, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4, dtype=dtype)
    w[1] *= 1e20
    ref_scale, ref_codes = torchao_mxfp4(w, rule)
    q = get_format(f"mxfp4_{rule}").quantize(w)
    assert torch.equal(ref_scale, q.scale)
    assert torch.equal(ref_codes, q.codes)


def _exp(amax: float, rule: str) -> int:
    return int(mx_exponent(torch.tensor([amax]), rule).item()) - 127


@pytest.mark.parametrize(("rule", "amax", "expected"), [
    ("floor", 6.0, 0), ("floor", 7.9, 0), ("floor", 8.0, 1),
    ("even", 6.9, 0), ("even", 7.0, 1),  # mantissa 1.75 rounds the amax up to 8
    ("rceil", 6.0, 0), ("rceil", 6.01, 1), ("rceil", 3.0, -1),
    ("ceil", 4.0, 0), ("ceil", 4.01, 1),
])
def test_exponent_rule_boundaries(rule, amax, expected):
    assert _exp(amax, rule) == expected


@pytest.mark.parametrize("rule", RULES)
def test_zero_block_gets_the_smallest_exponent(rule):
    q = get_format(f"mxfp4_{rule}").quantize(torch.zeros(2, 32))
    assert (q.scale == 0).all() and (q.codes == 0).all()


@pytest.mark.parametrize("rule", RULES)
def test_huge_block_exponent_stays_below_nan_code(rule):
    assert int(mx_exponent(torch.tensor([3.4e38]), rule).item()) <= 252  # 6 * 2**125 < fp32 max


@pytest.mark.parametrize("rule", ["rceil", "ceil"])
def test_ceiling_rules_never_clip_the_block_max(rule):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    f = get_format(f"mxfp4_{rule}")
    d = f.fake(w)
    assert (d.abs().amax(1) >= w.abs().amax(1) * 0.75).all()  # amax lands on >= 4 of 6, unclipped


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("magnitude", [1e-40, 1e-20, 1.0, 1e20, 3.4e38])
def test_finite_input_dequantizes_finite(rule, magnitude):
    w = (torch.rand(8, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1) * magnitude
    assert torch.isfinite(get_format(f"mxfp4_{rule}").fake(w)).all()


def test_input_dim_not_multiple_of_32_raises_format_error():
    with pytest.raises(FormatError, match="not a multiple of the block size 32"):
        get_format("mxfp4").quantize(torch.randn(4, 48))


def test_unknown_rule_raises_format_error():
    with pytest.raises(FormatError, match="unknown MX exponent rule"):
        mx_exponent(torch.tensor([1.0]), "nearest")


def test_floor_relative_error_on_gaussian_matches_spec_anchor():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    err = ((get_format("mxfp4_floor").fake(w) - w).norm() / w.norm()).item()
    assert 0.105 < err < 0.125  # spec anchor 0.115


@pytest.mark.parametrize("rule", RULES)
def test_quantize_is_idempotent(rule):
    f = get_format(f"mxfp4_{rule}")
    once = f.fake(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(f.fake(once), once)


def test_storage_is_at_most_027_of_bf16():
    w = torch.randn(576, 1536, dtype=torch.bfloat16)
    assert get_format("mxfp4").quantize(w).nbytes / (w.numel() * 2) <= 0.27


def test_has_no_global_scale():
    f = get_format("mxfp4")
    assert f.weight_global_scale(torch.randn(2, 32)) is None and f.quantize(torch.randn(2, 32)).global_scale is None


def test_activation_is_per_32_block_qdq_in_input_dtype():
    f = get_format("mxfp4")
    x = torch.randn(2, 4, 64, dtype=torch.bfloat16)
    expected = f.dequantize(f.quantize(x.reshape(8, 64)), torch.bfloat16).reshape(x.shape)
    assert torch.equal(f.fake_activation(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_negatives_rounding_to_zero_are_code_8_like_compressed_tensors(dtype):
    w = -(torch.rand(8, 64, generator=torch.Generator().manual_seed(4)) * 1e-3)
    w[:, ::32] = 1.0
    w[0, 1] = -0.0
    w = w.to(dtype)
    ref, q = ct_mxfp4(w), get_format("mxfp4_even").quantize(w)
    codes = torch.stack([q.codes & 0xF, q.codes >> 4], dim=-1).flatten()
    assert (codes == 8).sum() == w.numel() - w.shape[0] * 2 - 1
    assert codes[1] == 0  # the exact -0.0
    assert torch.equal(ref["weight_packed"], q.codes)
