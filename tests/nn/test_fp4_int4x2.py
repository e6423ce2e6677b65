"""FP4 W4A16 decode on torch's INT4 kernel (opt-in, QUANTKIT_FP4_DECODE=int4x2): the split of
2 * E2M1 into two INT4 halves is exact and invertible, the forward matches the reference
dequantize-then-matmul within the torch weight-only tolerance (docs/runtime.md), and the converted
codes give the canonical ones back for export, state_dict and the tiled prefill path."""

import pytest
import torch
import torch.nn.functional as F

from quantkit.formats import e2m1
from quantkit.nn.kernels import Device, choose
from quantkit.nn.kernels import fp4_int4
from quantkit.nn.kernels.select import FP4_DECODE_ENV
from quantkit.nn.qlinear import quantize_linear

from tests.nn.test_kernels import ACCUMULATION, TORCH_WOQ_ACCUMULATION, _assert_close_to_reference, _layer

# (out, in): SmolLM2 q_proj, a partial last kernel row block (80 = 64 + 16), 208 = 6 * 32 + 16
SHAPES = [(576, 576), (80, 96), (208, 160)]
AVX2 = Device("cpu", bf16_gemm=False)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # E4M3 scales have no torch.equal kernel; compare their bytes
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture
def opt_in(monkeypatch):
    monkeypatch.setenv(FP4_DECODE_ENV, "int4x2")


def test_halves_sum_to_twice_every_e2m1_value():
    codes = torch.arange(16)
    a = fp4_int4.A_NIBBLE[codes] - fp4_int4.INT4_OFFSET
    b = fp4_int4.B_NIBBLE[codes] - fp4_int4.INT4_OFFSET
    assert torch.equal((a + b).float(), 2 * e2m1.decode(codes.to(torch.uint8)))
    assert int(a.abs().max()) <= 7 and int(b.abs().max()) <= 7  # inside INT4's [-8, 7]
    pairs = fp4_int4.A_NIBBLE[codes] << 4 | fp4_int4.B_NIBBLE[codes]
    assert torch.equal(fp4_int4.CODE_OF_PAIR[pairs].long(), codes)  # -0 (code 8) too


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("shape", SHAPES + [(2112, 64)])
def test_pack_round_trips_bit_for_bit(shape, block, monkeypatch):
    monkeypatch.setattr(fp4_int4, "CONVERT_ROWS", 128)  # several chunks, a ragged last one
    out_f, in_f = shape
    codes = torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8)
    packed = fp4_int4.pack(codes, block)
    assert packed.shape == (out_f, in_f)  # one byte per weight: twice the canonical codes
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(fp4_int4.split_nibbles(codes, block), 1)
    assert torch.equal(packed.reshape(-1), whole.reshape(-1))  # chunked conversion = one conversion
    assert torch.equal(fp4_int4.unpack(packed, out_f, in_f, block), codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4x2_forward_matches_dequantize_then_matmul(name, shape, rows, dtype, opt_in):
    lin = _layer(shape, dtype)
    q = quantize_linear(lin, name, mode="real")
    assert q.kernel_for(dtype).for_rows(rows) == "fp4_int4x2"
    x = torch.randn(rows, shape[1], dtype=dtype)
    w_ref = q.dequantized_weight(dtype)
    # bf16: torch's kernel rounds inside in bf16 and reads d/2 rounded to bf16 (NVFP4); fp32: d/2
    # and every product exact, only the summation order differs
    acc = TORCH_WOQ_ACCUMULATION if dtype == torch.bfloat16 else ACCUMULATION
    _assert_close_to_reference(q(x), x, w_ref, lin.bias.detach(), acc)


def test_mxfp4_bf16_table_is_exact():
    # MXFP4 divisors are powers of two: d/2 in bf16 is exact, so the kernel's weight is the reference's
    d = torch.tensor([[2.0**-20, 2.0**3], [1.0, 2.0**-126]])
    sz = fp4_int4.scales_and_zeros(d, torch.bfloat16)  # [nb, out, 2]
    assert torch.equal(sz[..., 0].t().float(), d / 2) and not sz[..., 1].any()


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_after_conversion_export_state_dict_and_prefill_are_unchanged(name, opt_in, cpu_without_bf16_gemm):
    from quantkit.export.compressed_tensors import module_tensors

    shape = (208, 160)
    fresh = quantize_linear(_layer(shape), name, mode="real")
    q = quantize_linear(_layer(shape), name, mode="real")
    canonical = q.weight_codes.clone()
    before, _, _ = module_tensors("layer", q)
    x1 = torch.randn(1, shape[1], dtype=torch.bfloat16)
    q(x1)  # converts in place
    assert q._codes_layout == "fp4_int4x2"
    assert q.weight_codes.numel() == 2 * canonical.numel()  # not beside the canonical codes
    assert torch.equal(q.qweight.codes, canonical)
    assert torch.equal(q.state_dict()["weight_codes"], canonical)
    after, _, _ = module_tensors("layer", q)
    assert before.keys() == after.keys() and all(_same_bits(before[k], after[k]) for k in before)
    x40 = torch.randn(40, shape[1], dtype=torch.bfloat16)
    assert q.kernel_for(torch.bfloat16).for_rows(40) == "tiled_f32"
    assert torch.equal(q(x40), fresh(x40))  # the prefill path reads the unpacked canonical codes


def test_load_state_dict_after_conversion_takes_canonical_codes(opt_in):
    shape = (80, 96)
    q = quantize_linear(_layer(shape, seed=1), "nvfp4", mode="real")
    other = quantize_linear(_layer(shape, seed=2), "nvfp4", mode="real")
    x = torch.randn(1, shape[1], dtype=torch.bfloat16)
    q(x)  # converted: weight_codes now [80, 96], the state dict's are [80, 48]
    q.load_state_dict(other.state_dict())
    assert q._codes_layout == "canonical"
    assert torch.equal(q(x), other(x))  # converts again, with the loaded scales


def test_int4x2_is_opt_in_and_refuses_what_the_kernel_cannot_take(monkeypatch):
    bf16 = torch.bfloat16
    monkeypatch.delenv(FP4_DECODE_ENV, raising=False)
    assert choose("nvfp4", None, "real", (576, 576), AVX2, bf16).name == "tiled_dequant"  # default
    monkeypatch.setenv(FP4_DECODE_ENV, "int4x2")  # what QLinear and `quantkit inspect` read
    assert choose("nvfp4", None, "real", (576, 576), AVX2, bf16).name == "fp4_int4x2"
    assert choose("nvfp4", None, "real", (576, 576), AVX2, bf16, fp4_int4x2=False).name == "tiled_dequant"
    c = choose("nvfp4", None, "real", (576, 576), AVX2, bf16, fp4_int4x2=True)
    assert (c.name, c.for_rows(1), c.for_rows(512)) == ("fp4_int4x2", "fp4_int4x2", "tiled_f32")
    assert choose("mxfp4", None, "real", (576, 576), AVX2, torch.float32, fp4_int4x2=True).name == "fp4_int4x2"
    refused = [
        choose("nvfp4", None, "real", (100, 96), AVX2, bf16, fp4_int4x2=True),  # out % 16
        choose("nvfp4", None, "real", (96, 96), AVX2, torch.float16, fp4_int4x2=True),  # fp16 range
        choose("nvfp4", None, "real", (96, 96), Device("cuda", capability=(9, 0)), bf16, fp4_int4x2=True),
        choose("nvfp4", "nvfp4", "real", (96, 96), AVX2, bf16, fp4_int4x2=True),  # W4A4
    ]
    assert [r.name for r in refused] == ["tiled_dequant", "tiled_dequant", "tiled_dequant", "fake_act_tiled"]
    assert "refused" in refused[0].reason and "refused" in refused[1].reason


def test_module_without_opt_in_keeps_canonical_codes(monkeypatch):
    monkeypatch.delenv(FP4_DECODE_ENV, raising=False)
    q = quantize_linear(_layer((80, 96)), "nvfp4", mode="real")
    q(torch.randn(1, 96, dtype=torch.bfloat16))
    assert q._codes_layout == "canonical" and q.kernel.name == "tiled_dequant"


def test_int4x2_layer_holds_no_dense_weight(opt_in):
    shape = (576, 576)
    q = quantize_linear(_layer(shape), "nvfp4", mode="real")
    q(torch.randn(1, shape[1], dtype=torch.bfloat16))
    sz = q._kcache["fp4x2_torch.bfloat16"]
    held = q.weight_codes.nbytes + sz.nbytes + q.weight_scale.nbytes + q.weight_global_scale.nbytes
    # codes: 1 byte per weight; table: (d/2, 0) in bf16 per 16-element block; E4M3 scales kept for export
    assert held == 576 * 576 * (1 + 4 / 16 + 1 / 16) + 4
    assert held < 576 * 576 * 2  # under the bf16 weight, over the packed one (hence opt-in)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "int4"])
def test_prefill_tiles_decoded_from_the_int4_layout_are_the_reference_rows(name, opt_in, monkeypatch,
                                                                          cpu_without_bf16_gemm):
    # after a decode forward converted the codes, prefill decodes 64-row tiles straight from torch's
    # layout (int4_tiled); 208 rows: three full tiles and a 16-row tail (a partial kernel block)
    from quantkit.nn.kernels import int4_tiled, tiled

    monkeypatch.setattr(tiled, "TILE_BYTES", 64 * 2 * 160)
    monkeypatch.setattr(tiled, "MIN_TILE_ROWS", 1)
    shape = (208, 160)
    lin = _layer(shape)
    q = quantize_linear(lin, name, mode="real")
    q(torch.randn(1, shape[1], dtype=torch.bfloat16))  # converts in place
    assert q._codes_layout in ("int4_cpu", "fp4_int4x2")
    calls = []
    monkeypatch.setattr(int4_tiled, "_tile_values", lambda *a, f=int4_tiled._tile_values: calls.append(1) or f(*a))
    x = torch.randn(40, shape[1], dtype=torch.bfloat16)
    y = q(x)
    assert len(calls) == 4  # the tiled path from the int4 layout ran, tile by tile
    w_ref = q.dequantized_weight(torch.bfloat16).float()
    ref = torch.cat([F.linear(x.float(), w_ref[r0 : r0 + 64]) for r0 in range(0, 208, 64)], dim=1)
    assert torch.equal(y, (ref + lin.bias.float()).to(torch.bfloat16))
