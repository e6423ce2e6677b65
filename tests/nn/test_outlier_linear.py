"""OutlierLinear (LLM.int8()): the spec §2.5 invariants and parity with bitsandbytes."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from quantkit.errors import FormatError
from quantkit.nn.outlier_linear import INT8_ABSMAX_DIVISOR, OutlierLinear, int8_matmul, quantize_rows_absmax

IN, OUT, TOKENS = 96, 80, 40
# bitsandbytes returns fp16; our fp32 epilogue differs from it by fp16 output rounding only
BNB_PARITY_RTOL = 2e-3


def _linear(bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    # fp16-representable weights so bitsandbytes' fp16 cast is lossless
    lin.weight.data = lin.weight.data.half().float()
    if bias:
        lin.bias.data = lin.bias.data.half().float()
    return lin


def _x(seed: int = 1, outlier_col: int | None = 7, factor: float = 20.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, IN, generator=g)
    if outlier_col is not None:
        x[:, outlier_col] *= factor
    return x.half().float()


def _vectorwise_int8_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pure vector-wise int8 (no outliers), integer product in int64, epilogue in fp64."""
    cx = x.abs().amax(1, keepdim=True)
    cw = w.abs().amax(1)
    xq = torch.round(x * (INT8_ABSMAX_DIVISOR / cx)).to(torch.int64)
    wq = torch.round(w * (INT8_ABSMAX_DIVISOR / cw)[:, None]).to(torch.int64)
    return (xq @ wq.t()).double() * cx.double() * cw.double() / INT8_ABSMAX_DIVISOR**2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_threshold_inf_equals_pure_vectorwise_int8():
    lin, x = _linear(), _x()
    mod = OutlierLinear.from_linear(lin, threshold=math.inf)
    y = mod(x)
    ref = _vectorwise_int8_reference(x, lin.weight.data)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


def test_threshold_zero_static_equals_16bit_matmul():
    lin, x = _linear(bias=True), _x()
    mod = OutlierLinear.from_linear(lin, threshold=0.0, outliers="static", outlier_idx=torch.arange(IN))
    torch.testing.assert_close(mod(x), lin(x), rtol=1e-5, atol=1e-5)


def test_threshold_zero_dynamic_equals_matmul_with_dequantized_weight():
    lin, x = _linear(), _x()
    mod = OutlierLinear.from_linear(lin, threshold=0.0)
    torch.testing.assert_close(mod(x), x @ mod.dequantized_weight().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("outliers", ["dynamic", "static"])
def test_decomposition_lowers_error_on_outlier_column(outliers):
    lin, x = _linear(), _x(factor=20.0)
    ref = lin(x)
    idx = torch.tensor([7]) if outliers == "static" else None
    with_dec = OutlierLinear.from_linear(lin, threshold=6.0, outliers=outliers, outlier_idx=idx)
    without = OutlierLinear.from_linear(lin, threshold=math.inf)
    assert _rel(with_dec(x), ref) < 0.5 * _rel(without(x), ref)


def test_row_scale_equivariance_without_outliers():
    lin, x = _linear(), _x(outlier_col=None)
    mod = OutlierLinear.from_linear(lin, threshold=math.inf)
    scaled = x.clone()
    scaled[5] *= 4.0  # a power of two keeps every fp32 product exact
    scaled[9] *= 0.25
    y, ys = mod(x), mod(scaled)
    assert torch.equal(ys[5], 4.0 * y[5]) and torch.equal(ys[9], 0.25 * y[9])
    assert torch.equal(ys[0], y[0])


def test_row_scale_equivariance_non_power_of_two():
    lin, x = _linear(), _x(outlier_col=None)
    mod = OutlierLinear.from_linear(lin, threshold=math.inf)
    scaled = x.clone()
    scaled[3] *= 3.7
    torch.testing.assert_close(mod(scaled)[3], 3.7 * mod(x)[3], rtol=1e-6, atol=1e-6)


def test_weight_row_scale_folds_into_output_column():
    lin, x = _linear(), _x()
    scaled = _linear()
    scaled.weight.data[11] *= 8.0
    y = OutlierLinear.from_linear(lin, threshold=6.0)(x)
    ys = OutlierLinear.from_linear(scaled, threshold=6.0)(x)
    torch.testing.assert_close(ys[:, 11], 8.0 * y[:, 11], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ys[:, 10], y[:, 10], rtol=0, atol=0)


def test_int32_accumulation_is_exact_past_fp32_integer_range():
    # 127 * 127 * 4096 = 66e6 > 2**24: a float32 accumulation would round
    k = 4096
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, 24), generator=g, dtype=torch.int8)
    a[0] = 127
    b[:, 0] = 127
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), a.long() @ b.long())
    assert got[0, 0].item() == 127 * 127 * k


def test_few_rows_are_padded_for_int_mm():
    lin = _linear()
    mod = OutlierLinear.from_linear(lin, threshold=math.inf)
    x = _x(outlier_col=None)
    one = mod(x[2:3].reshape(1, 1, IN))
    assert one.shape == (1, 1, OUT)
    torch.testing.assert_close(one.reshape(-1), mod(x)[2], rtol=0, atol=0)


def test_weight_codes_are_bnb_row_absmax_127():
    lin = _linear()
    codes, absmax = quantize_rows_absmax(lin.weight.data)
    w = lin.weight.data
    assert torch.equal(absmax, w.abs().amax(1))
    assert codes.abs().max().item() == 127  # the row max maps to exactly 127, never -128
    assert torch.equal(codes, torch.round(w * (127.0 / absmax)[:, None]).to(torch.int8))


def test_static_outlier_columns_keep_exact_16bit_weights():
    lin = _linear()
    lin.weight.data = lin.weight.data.bfloat16().float()
    mod = OutlierLinear.from_linear(lin.bfloat16(), outliers="static", outlier_idx=torch.tensor([3, 7]))
    assert torch.equal(mod.outlier_weight, lin.weight.data[:, [3, 7]].bfloat16())
    assert torch.equal(mod.weight_int8[:, [3, 7]], torch.zeros(OUT, 2, dtype=torch.int8))


def test_bf16_input_gives_bf16_output():
    lin = _linear(bias=True).bfloat16()
    mod = OutlierLinear.from_linear(lin, threshold=6.0)
    y = mod(_x().bfloat16().reshape(4, 10, IN))
    assert y.dtype == torch.bfloat16 and y.shape == (4, 10, OUT)


@pytest.mark.parametrize("bnb_compat", [False, True])
def test_16bit_input_runs_the_same_math_as_fp32(bnb_compat):
    lin = _linear(bias=True)
    mod = OutlierLinear.from_linear(lin, threshold=6.0, bnb_compat=bnb_compat)
    x = _x().bfloat16()
    assert torch.equal(mod(x), mod(x.float()).bfloat16())


def test_static_without_indices_is_rejected():
    with pytest.raises(FormatError, match="outlier_idx"):
        OutlierLinear.from_linear(_linear(), outliers="static")


def test_all_zero_row_gives_bias_not_nan():
    lin = _linear(bias=True)
    mod = OutlierLinear.from_linear(lin, threshold=6.0)
    x = _x()
    x[4] = 0
    y = mod(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[4], lin.bias.data, rtol=0, atol=0)


def test_stats_count_outlier_columns_and_int8_share():
    mod = OutlierLinear.from_linear(_linear(), threshold=6.0)
    mod.track_stats = True
    x = _x()
    x[:, 20] = 0
    x[0, 20] = 9.0  # a second outlier column, from one element
    mod(x)
    assert mod.stats["outlier_cols_max"] == 2
    assert mod.int8_share() == pytest.approx(1 - 2 / IN)


# -- parity with bitsandbytes' CPU LLM.int8 (eval mode runs the real decomposition) -------


def _bnb_linear(lin: nn.Linear, threshold: float):
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    mod = bnb.nn.Linear8bitLt(IN, OUT, bias=lin.bias is not None, has_fp16_weights=False, threshold=threshold)
    mod.load_state_dict(lin.state_dict())
    return mod.to("cpu").eval()  # .to() quantizes the weight


def test_bnb_parity_weight_codes_and_scales():
    lin = _linear()
    ref = _bnb_linear(lin, 6.0)
    mod = OutlierLinear.from_linear(lin, threshold=6.0, bnb_compat=True)
    assert torch.equal(mod.weight_int8, ref.weight.data)
    assert torch.equal(mod.weight_absmax, ref.weight.SCB)


@pytest.mark.parametrize("case", ["random", "outlier_heavy"])
def test_bnb_parity_outputs(case):
    lin = _linear(bias=True)
    if case == "random":
        x = _x(outlier_col=None)
    else:  # several outlier columns, one outlier element in an otherwise small column
        x = _x(outlier_col=7, factor=30.0)
        x[:, 50] *= 12.0
        x[3, 60] = -8.0
    ref = _bnb_linear(lin, 6.0)
    mod = OutlierLinear.from_linear(lin, threshold=6.0, bnb_compat=True)
    with torch.inference_mode():
        want = ref(x.half()).float()
        got = mod(x.half()).float()
    assert (got - want).abs().max().item() <= BNB_PARITY_RTOL * want.abs().max().item()
    assert _rel(got, want) < BNB_PARITY_RTOL


def test_bnb_threshold_zero_is_our_threshold_inf():
    # bitsandbytes reads threshold 0 as "no decomposition"; quantkit spells that inf
    lin, x = _linear(), _x()
    ref = _bnb_linear(lin, 0.0)
    mod = OutlierLinear.from_linear(lin, threshold=math.inf)
    with torch.inference_mode():
        want = ref(x.half()).float()
    assert _rel(mod(x.half()).float(), want) < BNB_PARITY_RTOL


def test_cpu_without_vnni_multiplies_exactly_without_int_mm(monkeypatch):
    """torch._int_mm is a scalar loop on CPUs without VNNI/AMX: the exact fp32 path is used there,
    with the same int32 sums (K past 1024, so the chunked accumulation is exercised)."""
    from quantkit.nn import outlier_linear as ol
    from quantkit.nn.kernels.select import Device

    monkeypatch.setattr(Device, "of", staticmethod(lambda device: Device("cpu", vnni=False)))

    def refuse(*_):
        raise AssertionError("torch._int_mm called on a CPU without VNNI")

    monkeypatch.setattr(torch, "_int_mm", refuse)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 2100), dtype=torch.int8, generator=g)
    b = torch.full((2100, 3), -128, dtype=torch.int8)  # every partial sum past 2**24 in the worst row
    a[0] = -128
    out = ol.int8_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), a.long() @ b.long())
