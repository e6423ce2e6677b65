"""compressed-tensors codecs: compressed-tensors' own decompressors read what we write."""

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme

from quantkit.errors import FormatError
from quantkit.export.ct_fp4 import CODECS
from quantkit.formats import get_format

COMPRESSORS = {"nvfp4": NVFP4PackedCompressor, "mxfp4": MXFP4PackedCompressor, "int4": PackedQuantizationCompressor,
               "int4_g128": PackedQuantizationCompressor, "int4_ch": PackedQuantizationCompressor}


def _weight(dtype=torch.bfloat16) -> torch.Tensor:
    return (torch.randn(32, 256, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_compressed_tensors_decompresses_to_our_dequantized_weight(name):
    fmt, w = get_format(name), _weight()
    qt = fmt.quantize(w)
    codec = CODECS[name]
    scheme = QuantizationScheme.model_validate(codec.scheme(name))
    dense = COMPRESSORS[name].decompress(codec.to_ct(qt), scheme)["weight"]
    assert torch.equal(dense.float(), fmt.dequantize(qt, dense.dtype).float())


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_from_ct_inverts_to_ct(name):
    qt = get_format(name).quantize(_weight())
    back = CODECS[name].from_ct(CODECS[name].to_ct(qt), qt.shape)
    assert torch.equal(get_format(back.format).dequantize(back), get_format(name).dequantize(qt))


def test_nvfp4_tensors_have_compressed_tensors_names_dtypes_and_shapes():
    t = CODECS["nvfp4"].to_ct(get_format("nvfp4").quantize(_weight()))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "weight_packed": (torch.uint8, (32, 128)),
        "weight_scale": (torch.float8_e4m3fn, (32, 16)),
        "weight_global_scale": (torch.float32, (1,)),
    }


def test_mxfp4_tensors_have_no_global_scale_and_uint8_exponents():
    t = CODECS["mxfp4"].to_ct(get_format("mxfp4").quantize(_weight()))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in t.items()} == {
        "weight_packed": (torch.uint8, (32, 128)), "weight_scale": (torch.uint8, (32, 8))}


@pytest.mark.parametrize(("fmt", "act", "preset_format"), [
    ("nvfp4", None, "nvfp4-pack-quantized"), ("nvfp4", "nvfp4", "nvfp4-pack-quantized"),
    ("mxfp4", None, "mxfp4-pack-quantized"), ("mxfp4", "mxfp4", "mxfp4-pack-quantized"),
    ("int4", None, "pack-quantized")])
def test_scheme_names_the_compressed_tensors_format(fmt, act, preset_format):
    assert CODECS[fmt].scheme(fmt, act)["format"] == preset_format == CODECS[fmt].ct_format


def test_nvfp4_w4a4_scheme_has_static_global_dynamic_local_activations():
    acts = CODECS["nvfp4"].scheme("nvfp4", "nvfp4")["input_activations"]
    assert (acts["dynamic"], acts["observer"], acts["group_size"], acts["strategy"]) == (
        "local", "static_minmax", 16, "tensor_group")


def test_w4a16_schemes_have_no_input_activations():
    assert all(CODECS[f].scheme(f)["input_activations"] is None for f in ("nvfp4", "mxfp4", "int4"))


def test_int4_scheme_states_its_group_size():
    assert CODECS["int4_g128"].scheme("int4_g128")["weights"]["group_size"] == 128
    assert CODECS["int4"].scheme("int4")["weights"]["group_size"] == 32


def test_unsupported_activation_pair_raises_format_error():
    with pytest.raises(FormatError, match="no preset"):
        CODECS["int4"].scheme("int4", "nvfp4")
