"""INT4 symmetric weight-only: compressed-tensors arithmetic and packing, names, errors."""

import pytest
import torch
from fp4_reference import ct_int4

from quantkit.errors import FormatError
from quantkit.formats import FORMATS, get_format
from quantkit.formats.e2m1 import unpack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("name", "group"), [("int4", 32), ("int4_g128", 128), ("int4_ch", None)])
def test_codes_and_scales_equal_compressed_tensors(dtype, name, group):
    w = (torch.randn(32, 256, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    w[0, :32] = 0.0
    ref, q = ct_int4(w, group), get_format(name).quantize(w)
    assert torch.equal(unpack(q.codes).to(torch.int16) - 8, ref["q"].to(torch.int16))
    assert torch.equal(q.scale, ref["weight_scale"].reshape(q.scale.shape))


def test_packed_bytes_read_as_int32_equal_compressed_tensors_pack_quantized():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    ref, q = ct_int4(w, 32), get_format("int4").quantize(w)
    assert torch.equal(q.codes.view(torch.int32), ref["weight_packed"])


def test_registered_names_and_group_sizes():
    assert {n: FORMATS.get(n).group for n in ("int4", "int4_g64", "int4_g128", "int4_ch")} == {
        "int4": 32, "int4_g64": 64, "int4_g128": 128, "int4_ch": 0}


def test_smollm2_width_576_is_rejected_by_group_128_with_format_error():
    with pytest.raises(FormatError, match="576.*block size 128"):
        get_format("int4_g128").quantize(torch.randn(4, 576))


def test_zero_group_dequantizes_to_zero():
    w = torch.randn(2, 64)
    w[0, :32] = 0
    f = get_format("int4")
    assert (f.fake(w)[0, :32] == 0).all()


def test_codes_stay_in_signed_4_bit_range():
    w = torch.randn(8, 64) * 10
    codes = unpack(get_format("int4").quantize(w).codes).to(torch.int16) - 8
    assert codes.min() >= -8 and codes.max() <= 7


def test_nan_becomes_zero_and_inf_saturates():
    w = torch.randn(2, 32)
    w[0, 0], w[1, 1] = float("nan"), float("inf")
    d = get_format("int4").fake(w)
    assert d[0, 0] == 0 and torch.isfinite(d).all() and d[1, 1] == d[1].max()


def test_group_32_error_is_below_per_channel_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    err = {n: (get_format(n).fake(w) - w).norm().item() for n in ("int4", "int4_ch")}
    assert err["int4"] < err["int4_ch"]
