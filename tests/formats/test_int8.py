"""INT8 equals compressed-tensors' W8A8 quantization bit for bit."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams

from quantkit.formats import get_format
from quantkit.nn.qlinear import quantize_linear

INT8 = get_format("int8")
CT_WEIGHT_ARGS = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")


def ct_reference(w):
    scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), CT_WEIGHT_ARGS)
    return quantize(w, scale, zp, CT_WEIGHT_ARGS, dtype=torch.int8), scale


def edge_matrix(dtype):
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    w[0] = 0  # all-zero row
    w[1] *= 1e-30  # tiny row
    w[2] *= 1e20  # huge row
    w[3, 5] = 1000  # one outlier
    w[4] = torch.linspace(-127.5, 127.5, 64)  # exact .5 ties after scaling
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["random", "edge"])
def test_codes_and_scales_equal_compressed_tensors(dtype, kind):
    torch.manual_seed(0)
    w = (torch.randn(48, 96) * 0.05).to(dtype) if kind == "random" else edge_matrix(dtype)
    q = INT8.quantize(w)
    ref_codes, ref_scale = ct_reference(w)
    assert q.scale.dtype == dtype
    assert torch.equal(q.scale, ref_scale)
    assert torch.equal(q.codes, ref_codes)


def test_divisor_is_127_5_not_127():
    w = torch.tensor([[127.5, -127.5, 1.0, 0.0]])
    q = INT8.quantize(w)
    assert q.scale.item() == 1.0 and q.codes.tolist() == [[127, -128, 1, 0]]


def test_all_zero_row_gets_finite_scale_and_zero_codes():
    q = INT8.quantize(torch.zeros(2, 8))
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all() and (q.codes == 0).all()


def test_error_is_at_most_half_a_step():
    # the CT rule maps the row max to 127.5 steps, which clamps to 127: still within half a step
    torch.manual_seed(0)
    w = torch.randn(16, 32, dtype=torch.float64)
    q = INT8.quantize(w)
    assert ((INT8.dequantize(q, torch.float64) - w).abs() <= q.scale / 2 + 1e-12).all()


def test_ct_rule_is_not_idempotent_because_the_max_clamps():
    # documented quirk (docs/formats.md): re-quantizing shrinks the row amax from 127.5 to 127 steps
    w = torch.tensor([[127.5, 3.0, -20.0, 0.25]], dtype=torch.float64)
    once = INT8.fake(w)
    assert once[0, 0].item() == 127.0
    assert not torch.equal(INT8.fake(once), once)


def test_int_mm_path_accumulates_exactly_in_int32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    q = quantize_linear(linear, "int8", mode="real", act_format="int8")
    x = torch.randn(20, 64)
    from quantkit.formats.int8 import quantize_rows

    xq, xs = quantize_rows(x)
    exact = (xq.long() @ q.weight_codes.long().t()).double() * xs.double() * q.weight_scale.double().t()
    assert torch.allclose(q(x).double(), exact, rtol=1e-6, atol=1e-6)


def test_real_and_fake_modes_agree():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    real = quantize_linear(linear, "int8", mode="real", act_format="int8")(x)
    fake = quantize_linear(linear, "int8", mode="fake", act_format="int8")(x)
    assert torch.allclose(real, fake, atol=1e-5)
