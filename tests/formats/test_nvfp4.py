"""NVFP4: compressed-tensors bit-exactness, scales, edge cases, activations."""

import pytest
import torch
from fp4_reference import HAS_TORCHAO, ct_nvfp4, edge_weight

from quantkit.errors import FormatError
from quantkit.formats import get_format

NVFP4 = get_format("nvfp4")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_codes_and_scales_equal_compressed_tensors_on_edge_weights(dtype, seed):
    w = edge_weight(dtype, seed=seed)
    ref, q = ct_nvfp4(w), NVFP4.quantize(w)
    assert torch.equal(ref["weight_packed"], q.codes)
    assert torch.equal(_bits(ref["weight_scale"]), _bits(q.scale))
    assert torch.equal(ref["weight_global_scale"], q.global_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1.0, 1e30])
def test_codes_and_scales_equal_compressed_tensors_on_random_weights(dtype, magnitude):
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * magnitude).to(dtype)
    ref, q = ct_nvfp4(w), NVFP4.quantize(w)
    assert torch.equal(ref["weight_packed"], q.codes)
    assert torch.equal(_bits(ref["weight_scale"]), _bits(q.scale))
    assert torch.equal(ref["weight_global_scale"], q.global_scale)


def test_global_scale_is_2688_over_amax_in_weight_dtype():
    w = torch.tensor([[0.3, -1.7] + [0.0] * 14], dtype=torch.bfloat16)
    expected = (2688.0 / torch.tensor(1.7, dtype=torch.bfloat16)).float()
    assert NVFP4.weight_global_scale(w).item() == expected.item()


def test_all_zero_weight_has_global_scale_one_and_block_scale_0125():
    q = NVFP4.quantize(torch.zeros(2, 32))
    assert q.global_scale.item() == 1.0
    assert (q.scale.float() == 0.125).all() and (q.codes == 0).all()


def test_nan_and_inf_weights_never_set_the_global_scale():
    w = torch.randn(4, 32)
    ref = NVFP4.weight_global_scale(w)
    w[0, 0], w[1, 1] = float("nan"), float("inf")
    assert NVFP4.weight_global_scale(w).item() == ref.item()


def test_inf_saturates_and_nan_becomes_zero():
    w = torch.randn(2, 16)
    w[0, 0], w[0, 1], w[1, 0] = float("inf"), float("-inf"), float("nan")
    d = NVFP4.fake(w)
    assert d[0, 0] > 0 and d[0, 1] < 0 and d[1, 0] == 0 and torch.isfinite(d).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e-40, 1e-20, 1.0, 1e20, 3.38e38])
def test_finite_input_dequantizes_finite(dtype, magnitude):
    w = ((torch.rand(8, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1) * magnitude).to(dtype)
    assert torch.isfinite(NVFP4.fake(w)).all()


def test_input_dim_not_multiple_of_16_raises_format_error():
    with pytest.raises(FormatError, match="not a multiple of the block size 16"):
        NVFP4.quantize(torch.randn(4, 40))


def test_relative_error_on_gaussian_matches_spec_anchor():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    err = ((NVFP4.fake(w) - w).norm() / w.norm()).item()
    assert 0.085 < err < 0.105  # spec anchor 0.095


def test_quantize_is_idempotent():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    once = NVFP4.fake(w)
    assert torch.equal(NVFP4.fake(once), once)


def test_storage_is_at_most_029_of_bf16():
    w = torch.randn(576, 1536, dtype=torch.bfloat16)
    assert NVFP4.quantize(w).nbytes / (w.numel() * 2) <= 0.29


def test_given_global_scale_is_used_and_stored():
    w = torch.randn(4, 32)
    gs = NVFP4.weight_global_scale(w) / 2  # a fused group's minimum is never larger
    assert NVFP4.quantize(w, global_scale=gs).global_scale.item() == gs.item()


def test_activation_with_static_global_scale_matches_weight_path():
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    gs = NVFP4.activation_global_scale(x.float().abs().amax())
    expected = NVFP4.dequantize(NVFP4.quantize(x.reshape(15, 64), gs), torch.bfloat16).reshape(x.shape)
    assert torch.equal(NVFP4.fake_activation(x, gs), expected)


def test_activation_without_global_scale_is_dynamic_per_tensor():
    x = torch.randn(7, 64)
    assert torch.equal(NVFP4.fake_activation(x), NVFP4.fake_activation(x, NVFP4.weight_global_scale(x)))


def test_activation_keeps_dtype_and_shape():
    x = torch.randn(2, 3, 32, dtype=torch.float16)
    y = NVFP4.fake_activation(x)
    assert y.dtype == torch.float16 and y.shape == x.shape


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not importable")
def test_fp32_codes_and_scales_equal_torchao_given_the_same_global_scale():
    # torchao stores the reciprocal (amax/2688) and computes amax/6 in fp32; for fp32 weights and
    # the same global scale its conventions agree with compressed-tensors' bit for bit
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    pts = per_tensor_amax_to_scale(w.abs().amax())
    ref_scale, ref_codes = nvfp4_quantize(w, 16, pts)
    q = NVFP4.quantize(w, (1 / pts).reshape(1))
    assert torch.equal(_bits(ref_scale), _bits(q.scale))
    assert torch.equal(ref_codes.view(torch.uint8), q.codes)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_negatives_rounding_to_zero_are_code_8_like_compressed_tensors(dtype):
    # one large value per block makes the small negatives round to zero; -0.0 stays code 0
    w = -(torch.rand(8, 64, generator=torch.Generator().manual_seed(4)) * 1e-3)
    w[:, ::16] = 1.0
    w[0, 1] = -0.0
    w = w.to(dtype)
    ref, q = ct_nvfp4(w), NVFP4.quantize(w)
    codes = _nibbles(q.codes)
    assert (codes == 8).sum() == w.numel() - w.shape[0] * 4 - 1
    assert codes[1] == 0  # the exact -0.0
    assert torch.equal(ref["weight_packed"], q.codes)
