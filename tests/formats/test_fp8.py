"""FP8 (float-quantized): codes and scales equal compressed-tensors' bit for bit, edge tensors too."""

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize, quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, compute_dynamic_scales_and_zp

from quantkit.errors import FormatError
from quantkit.export.ct_fp8 import CODECS
from quantkit.formats import get_format
from quantkit.nn.qlinear import QLinear

PRESET = {"fp8": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK"}


def _args(name: str, which: str = "weights"):
    return getattr(preset_name_to_scheme(PRESET[name], ["Linear"]), which)


def _ct_reference(name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' (codes, scale): min/max as llm-compressor's minmax observer reduces them
    (per row, or per 128x128 tile of the zero-padded weight), then CT's calculate_qparams + quantize."""
    args = _args(name)
    if name == "fp8":
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        rows, cols = w.shape
        r, c = -(-rows // 128), -(-cols // 128)
        p = torch.zeros(r * 128, c * 128, dtype=w.dtype)
        p[:rows, :cols] = w
        tiles = p.reshape(r, 128, c, 128)
        lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    scale, zp = calculate_qparams(lo, hi, args)
    codes = quantize(w, scale, zp, args, dtype=torch.float8_e4m3fn)
    return codes, scale


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8 if t.element_size() == 1 else torch.int16)


def _edge_weights(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(160, 200, generator=g)  # neither dim a multiple of 128: partial tiles
    huge, tiny = base.clone(), base.clone()
    huge[3] *= 1e30 if dtype == torch.float32 else 1e36
    tiny[5] *= 1e-30
    zeros = base.clone()
    zeros[7] = 0
    zeros[:, :128] = 0  # whole zero tiles and rows
    mixed = base.clone()
    mixed[0, :4] = torch.tensor([448.0, -448.0, 1e-3, 3.0e38 if dtype == torch.float32 else 3.0e38])
    return {"gauss": base.to(dtype), "huge": huge.to(dtype), "tiny": tiny.to(dtype), "zeros": zeros.to(dtype),
            "mixed": mixed.to(dtype), "all_zero": torch.zeros(128, 256, dtype=dtype)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["fp8", "fp8_block"])
def test_codes_and_scales_equal_compressed_tensors_bit_for_bit(name, dtype):
    fmt = get_format(name)
    for kind, w in _edge_weights(dtype).items():
        qt = fmt.quantize(w)
        codes, scale = _ct_reference(name, w)
        assert qt.codes.dtype == torch.float8_e4m3fn and qt.scale.dtype == dtype, kind
        assert torch.equal(_bits(qt.codes), _bits(codes)), kind
        assert torch.equal(_bits(qt.scale), _bits(scale.to(dtype))), kind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["fp8", "fp8_block"])
def test_dequantize_equals_compressed_tensors_decompression(name, dtype):
    fmt, w = get_format(name), _edge_weights(dtype)["gauss"]
    qt = fmt.quantize(w)
    ref = dequantize(qt.codes, qt.scale, None, _args(name))
    assert torch.equal(fmt.dequantize(qt, dtype), ref.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", ["fp8", "fp8_block"])
def test_dynamic_activations_equal_compressed_tensors(name, dtype):
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 1] = 0  # an all-zero token
    x[1, 2, :7] *= 1e4
    args = _args(name, "input_activations")
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    ref = fake_quantize(x, scale, zp, args)
    assert torch.equal(_bits(get_format(name).fake_activation(x)), _bits(ref))


def test_block_activations_refuse_a_dim_that_is_not_a_multiple_of_128():
    with pytest.raises(FormatError, match="multiple of 128"):
        get_format("fp8_block").fake_activation(torch.randn(2, 3, 576))


def test_nan_weights_are_a_clear_error():
    w = torch.randn(4, 128)
    w[1, 2] = float("nan")
    with pytest.raises(FormatError, match="NaN or Inf"):
        get_format("fp8").quantize(w)


@pytest.mark.parametrize("name", ["fp8", "fp8_block"])
def test_codec_round_trips_and_writes_the_preset(name):
    fmt, w = get_format(name), torch.randn(192, 256).to(torch.bfloat16)
    qt = fmt.quantize(w)
    codec = CODECS[name]
    tensors = codec.to_ct(qt)
    assert set(tensors) == {"weight", "weight_scale"} and tensors["weight"].dtype == torch.float8_e4m3fn
    back = codec.from_ct(tensors, (192, 256))
    assert torch.equal(fmt.dequantize(back, torch.bfloat16), fmt.dequantize(qt, torch.bfloat16))
    s = codec.scheme(name, name)
    assert s["format"] == "float-quantized" and s["weights"]["type"] == "float" and s["input_activations"]["dynamic"]
    assert s["weights"]["strategy"] == ("channel" if name == "fp8" else "block")
    assert codec.scheme(name, None)["input_activations"] is None


@pytest.mark.parametrize("name", ["fp8", "fp8_block"])
def test_real_and_fake_qlinear_agree_and_survive_float(name):
    fmt = get_format(name)
    w, x = torch.randn(64, 256).to(torch.bfloat16), torch.randn(3, 256).to(torch.bfloat16)
    qt = fmt.quantize(w)
    fake = QLinear(qt, None, mode="fake", act_format=name, compute_dtype=torch.bfloat16)
    real = QLinear(fmt.quantize(w), None, mode="real", act_format=name, compute_dtype=torch.bfloat16)
    assert torch.equal(fake(x), real(x))
    dense_bf16 = fmt.dequantize(qt, torch.bfloat16)
    real.float()  # buffers become fp32; dequantization must still round in the scale's own dtype
    assert torch.equal(real.dequantized_weight(torch.float32), dense_bf16.float())


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


# the tiny model's dims (64, 128) make every 128x128 weight tile partial; its 64-wide inputs cannot be
# cut into 128-groups, so fp8_block is checked weight-only there
@pytest.mark.parametrize("name,act", [("fp8", "fp8"), ("fp8", None), ("fp8_block", None)])
def test_checkpoint_loads_in_transformers_with_identical_logprobs(tmp_path, name, act):
    import json

    from transformers import AutoModelForCausalLM

    from quantkit.api import save_output
    from quantkit.arch import arch_info
    from quantkit.context import Context
    from quantkit.passes.quantize import Quantize
    from tests.tiny_models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Quantize(format=name, act_format=act, mode="fake").run(model, ctx)
    save_output(model, _NoTokenizer(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.inference_mode():
        ours = torch.log_softmax(model(ids).logits.float(), -1)
        theirs = torch.log_softmax(loaded(ids).logits.float(), -1)
    assert torch.equal(ours, theirs)
