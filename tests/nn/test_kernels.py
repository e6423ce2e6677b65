"""Real-mode kernels: each equals the reference dequantize-then-matmul within a stated tolerance,
int8 accumulation is exact, the routing (CPU and CUDA) is what docs/runtime.md says.

Tolerance (docs/runtime.md): against the fp64 product of the same (bf16) inputs and the
reference dense weight, |y - ref| <= 2**-7 * (|ref| + |bias|) + a * (|x| @ |W|.T): two output
roundings in bf16 (kernel output, then bias) plus accumulation error. a = 2**-16 (fp32
accumulation) for quantkit's own paths; the bf16 reference F.linear is checked against the same
bound. torch's CPU int8/int4 weight-only kernels round inside in bf16 (measured up to
4e-4 * sum|x||w| beyond output rounding), so for them a = 2**-9: one bf16 rounding per product.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import get_format
from quantkit.formats.int8 import quantize_rows
from quantkit.nn.kernels import Device, choose, kernel_summary
from quantkit.nn.kernels import int8 as k_int8
from quantkit.nn.kernels import tiled
from quantkit.nn.kernels.cuda import swizzle_scales
from quantkit.nn.qlinear import QLinear, quantize_linear

OUT_ROUNDING = 2.0**-7  # two bf16 roundings (kernel output, bias add), 2**-8 relative each
ACCUMULATION = 2.0**-16  # fp32 accumulation, relative to sum |x||w|
TORCH_WOQ_ACCUMULATION = 2.0**-9  # _weight_int8pack_mm / _weight_int4pack_mm_for_cpu: bf16 products

# (out, in): SmolLM2 q_proj, shapes that are not multiples of any kernel tile
SHAPES = [(576, 576), (80, 96), (208, 160)]
WEIGHT_ONLY = ["int8", "int4", "int4_g64", "int4_ch", "nvfp4", "mxfp4"]


def _layer(shape, dtype=torch.bfloat16, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.bias.mul_(4)
    return lin.to(dtype)


def _assert_close_to_reference(y, x, w_ref, bias, acc=ACCUMULATION):
    ref = x.double() @ w_ref.double().t()
    b = bias.double()
    ref = ref + b
    bound = OUT_ROUNDING * (ref.abs() + b.abs()) + acc * (x.double().abs() @ w_ref.double().abs().t())
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", WEIGHT_ONLY)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_weight_only_kernel_matches_dequantize_then_matmul(name, shape, rows, monkeypatch):
    if name == "int4_g64" and shape[1] % 64:
        pytest.skip("the format refuses an input dim that is not a multiple of its group")
    monkeypatch.setattr(tiled, "TILE_BYTES", 64 * shape[1])  # several tiles with a ragged last one
    monkeypatch.setattr(tiled, "MIN_TILE_ROWS", 48)
    lin = _layer(shape)
    q = quantize_linear(lin, name, mode="real")
    x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
    w_ref = q.dequantized_weight(torch.bfloat16)
    acc = TORCH_WOQ_ACCUMULATION if q.kernel.name in ("int8pack_mm", "int4pack_mm") else ACCUMULATION
    _assert_close_to_reference(q(x), x, w_ref, lin.bias.detach(), acc)
    _assert_close_to_reference(F.linear(x, w_ref, lin.bias), x, w_ref, lin.bias.detach())  # the bound is fair


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_fp32_prefill_path_matches_dequantize_then_matmul(name, monkeypatch):
    monkeypatch.setattr(tiled, "TILE_BYTES", 64 * 2 * 192)
    monkeypatch.setattr(tiled, "MIN_TILE_ROWS", 1)
    lin = _layer((208, 192))
    q = quantize_linear(lin, name, mode="real")
    x = torch.randn(33, 192, dtype=torch.bfloat16)
    w_ref = q.dequantized_weight(torch.bfloat16)
    _assert_close_to_reference(q._run("tiled_f32", x), x, w_ref, lin.bias.detach())


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "int4_ch"])
def test_tiled_path_is_bitwise_reference_per_tile_in_fp32(name, monkeypatch):
    # FP4, and int4 groups torch's kernel refuses (here 160): tiles of the reference weight
    monkeypatch.setattr(tiled, "TILE_BYTES", 64 * 4 * 160)
    monkeypatch.setattr(tiled, "MIN_TILE_ROWS", 1)
    lin = _layer((208, 160), torch.float32)
    q = quantize_linear(lin, name, mode="real")
    assert q.kernel.name == "tiled_dequant"
    x = torch.randn(7, 160)
    w_ref = q.dequantized_weight(torch.float32)
    for r0 in range(0, 208, 64):  # each tile's output equals F.linear on that tile of the reference
        r1 = min(208, r0 + 64)
        assert torch.equal(q(x)[:, r0:r1], F.linear(x, w_ref[r0:r1], lin.bias[r0:r1]))


def test_tile_scratch_is_one_tile_not_the_weight(monkeypatch):
    tiled.release_scratch()
    monkeypatch.setattr(tiled, "TILE_BYTES", 32 * 2 * 1536)
    monkeypatch.setattr(tiled, "MIN_TILE_ROWS", 32)
    q = quantize_linear(_layer((576, 1536)), "nvfp4", mode="real")
    q(torch.randn(3, 1536, dtype=torch.bfloat16))
    tile_elems = 32 * 1536
    # bf16 tile + fp32 decode + int32 indices and int32 value pairs (one per byte): 10 bytes per
    # tile element, plus the 256-entry pair LUT
    assert tiled.scratch_bytes() == tile_elems * (2 + 4 + 2 + 2) + 256 * 4
    assert tiled.scratch_bytes() < 576 * 1536 * 2 / 2  # under half the dense bf16 weight


# -- int8 ---------------------------------------------------------------------------------------
def test_exact_f32_int_gemm_equals_int64_matmul_beyond_2_pow_24():
    torch.manual_seed(0)
    k = 2500  # > EXACT_F32_K, ragged chunk; all -128 makes |acc| = 128*128*2500 > 2**24
    wq = torch.randint(-128, 128, (100, k), dtype=torch.int8)
    wq[0] = -128
    xq = torch.randint(-128, 128, (9, k), dtype=torch.int8)
    xq[0] = -128
    ref = xq.long() @ wq.long().t()
    acc = k_int8.int_gemm_exact_f32(xq.float(), wq, tile_rows=33)
    assert acc.dtype == torch.int32
    assert abs(int(ref[0, 0])) > 2**24
    assert torch.equal(acc.long(), ref)


def test_one_pass_f32_int_gemm_is_exact_when_the_row_bound_allows_it():
    torch.manual_seed(2)
    k = 3000  # three EXACT_F32_K chunks' worth, but small codes keep 128 * sum|w| < 2**24
    wq = torch.randint(-20, 21, (70, k), dtype=torch.int8)
    xq = torch.randint(-128, 128, (5, k), dtype=torch.int8)
    assert k_int8.exact_in_one_pass(wq)
    acc = k_int8.int_gemm_exact_f32(xq.float(), wq, tile_rows=32, one_pass=True)
    assert torch.equal(acc.long(), xq.long() @ wq.long().t())
    extreme = torch.full((3, k), -128, dtype=torch.int8)
    assert not k_int8.exact_in_one_pass(extreme)  # 128 * 128 * 3000 > 2**24: chunked instead


def test_int_mm_path_equals_int64_matmul():
    torch.manual_seed(1)
    wq = torch.randint(-128, 128, (64, 96), dtype=torch.int8)
    xq = torch.randint(-128, 128, (3, 96), dtype=torch.int8)  # < 17 rows: padded
    assert torch.equal(k_int8.int_gemm_int_mm(xq, wq).long(), xq.long() @ wq.long().t())


@pytest.mark.parametrize("shape", [(576, 1536), (80, 2100)])
@pytest.mark.parametrize("kernel", ["int8_exact_f32", "int_mm"])
def test_w8a8_forward_is_the_exact_integer_reference(shape, kernel):
    lin = _layer(shape)
    q = quantize_linear(lin, "int8", mode="real", act_format="int8")
    q.set_output_scale(torch.rand(shape[0]) + 0.5)
    x = torch.randn(2, 4, shape[1], dtype=torch.bfloat16) * 3
    flat = x.reshape(-1, shape[1])
    xq, xs = quantize_rows(flat)
    acc = xq.long() @ q.weight_codes.long().t()  # int64 reference accumulation
    ws = q.weight_scale.reshape(1, -1).float() * q.output_scale.reshape(1, -1)
    ref = (acc.float() * xs.float() * ws + lin.bias.float()).to(torch.bfloat16)
    y = q._run(kernel, flat)
    assert torch.equal(y, ref)
    if kernel == q.kernel.name:
        assert torch.equal(q(x), ref.reshape(2, 4, shape[0]))


def test_w8a16_kernel_chosen_for_bf16_and_tiled_for_fp32():
    q = quantize_linear(_layer((80, 96)), "int8", mode="real")
    assert q.kernel_for(torch.bfloat16).name == "int8pack_mm"
    assert q.kernel_for(torch.float32).name == "tiled_dequant"
    x = torch.randn(3, 96)
    assert torch.equal(q(x), F.linear(x, q.dequantized_weight(torch.float32), q.bias.float()))


def test_compile_failure_falls_back_to_eager_with_reference_values(monkeypatch):
    # (the compiled path itself is not bit-exact: inductor divides bf16 in fp32; docs/runtime.md)
    monkeypatch.setenv(k_int8.COMPILE_ENV, "1")
    monkeypatch.setattr(k_int8, "compile_failed", [])

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)  # compile unavailable: falls back to eager, same values
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    q, s = k_int8.quantize_activations(x, torch.int8)
    ref_q, ref_s = quantize_rows(x)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    assert k_int8.compile_failed


# -- routing ------------------------------------------------------------------------------------
CPU, CPU_VNNI = Device("cpu"), Device("cpu", vnni=True)
H100, B200 = Device("cuda", capability=(9, 0)), Device("cuda", capability=(10, 0))
BF16 = torch.bfloat16


@pytest.mark.parametrize(
    ("fmt", "act", "device", "dtype", "expected"),
    [
        ("int8", "int8", CPU, BF16, "int8_exact_f32"),
        ("int8", "int8", CPU_VNNI, BF16, "int_mm"),
        ("int8", "int8", H100, BF16, "int_mm"),
        ("int8", None, CPU, BF16, "int8pack_mm"),
        ("int8", None, CPU, torch.float32, "tiled_dequant"),
        ("int8", None, H100, BF16, "tiled_dequant"),
        ("int4", None, CPU, BF16, "int4pack_mm"),
        ("int4", None, H100, BF16, "tiled_dequant"),
        ("nvfp4", None, CPU, BF16, "tiled_dequant"),
        ("nvfp4", "nvfp4", CPU, BF16, "fake_act_tiled"),
        ("nvfp4", "nvfp4", H100, BF16, "fake_act_tiled"),
        ("nvfp4", "nvfp4", B200, BF16, "scaled_mm_nvfp4"),
        ("mxfp4", "mxfp4", B200, BF16, "scaled_mm_mxfp4"),
        ("mxfp4", None, B200, BF16, "tiled_dequant"),
    ],
)
def test_routing(fmt, act, device, dtype, expected):
    group = 32 if fmt == "int4" else None
    assert choose(fmt, act, "real", (576, 576), device, dtype, group).name == expected


def test_cpu_without_native_bf16_gemm_multiplies_prefill_in_fp32():
    avx2 = Device("cpu", bf16_gemm=False)
    for fmt, act, group in (("int8", None, None), ("int4", None, 32), ("nvfp4", None, None), ("mxfp4", "mxfp4", None)):
        c = choose(fmt, act, "real", (576, 576), avx2, BF16, group)
        assert (c.for_rows(1), c.for_rows(512)) == (c.name, "tiled_f32")
        assert c.name != "tiled_f32" and "no native bf16 GEMM" in c.reason
    assert choose("int8", None, "real", (576, 576), CPU, BF16).prefill is None  # AVX512-BF16/AMX: bf16 GEMM
    assert choose("int8", "int8", "real", (576, 576), avx2, BF16).prefill is None  # W8A8 is exact-integer
    assert choose("int8", None, "real", (576, 576), avx2, torch.float32).prefill is None


def test_routing_falls_back_where_torch_kernels_refuse_the_shape():
    assert choose("int4", None, "real", (100, 96), CPU, BF16, 32).name == "tiled_dequant"  # out % 16
    assert choose("int4_ch", None, "real", (96, 1000), CPU, BF16, 0).name == "tiled_dequant"  # group 1000
    assert choose("int8", "int8", "real", (100, 90), H100, BF16).name == "int8_exact_f32"  # not % 8
    assert choose("int8", "int8", "fake", (96, 96), CPU, BF16).name == "dense"


def test_swizzled_scales_follow_cublas_block_layout():
    rows, cols = 200, 6  # ragged in both directions: padded to 256 x 8
    s = torch.arange(1, rows * cols + 1, dtype=torch.float32).reshape(rows, cols)
    flat = swizzle_scales(s)
    assert flat.numel() == 256 * 8
    col_tiles = 2
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * col_tiles + c // 4
            offset = tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
            assert flat[offset] == s[r, c]
    assert int((flat == 0).sum()) == 256 * 8 - rows * cols


# -- dtype protection and reporting --------------------------------------------------------------
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "int8", "int4"])
def test_model_to_bf16_keeps_quantization_parameters_bitwise(name):
    lin = _layer((96, 64), torch.float32)
    q = quantize_linear(lin, name, mode="real", act_format="nvfp4" if name == "nvfp4" else None,
                        input_global_scale=torch.tensor([123.456]) if name == "nvfp4" else None)
    q.set_output_scale(torch.rand(96) + 0.5)
    before = {n: b.clone() for n, b in q.named_buffers()}
    model = nn.Sequential(q).to(torch.bfloat16)
    for n, b in model[0].named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    assert model[0].compute_dtype == torch.bfloat16 and model[0].bias.dtype == torch.bfloat16
    model.half()
    assert all(torch.equal(b, before[n]) for n, b in model[0].named_buffers())


def test_fake_mode_dense_cache_still_follows_dtype():
    q = quantize_linear(_layer((96, 64), torch.float32), "nvfp4", mode="fake")
    q.to(torch.bfloat16)
    assert q._dense.dtype == torch.bfloat16
    assert torch.equal(q._dense, q.dequantized_weight(torch.bfloat16))


def test_kernel_summary_names_each_quantized_linear():
    model = nn.Sequential(quantize_linear(_layer((96, 64)), "int8", mode="real", act_format="int8"),
                          nn.ReLU(), quantize_linear(_layer((64, 96)), "nvfp4", mode="real"))
    rows = kernel_summary(model)
    assert [(r["module"], r["kernel"]) for r in rows] == [("0", model[0].kernel.label), ("2", model[2].kernel.label)]
    assert rows[1]["kernel"].startswith("tiled_dequant")
    assert all(r["reason"] and r["dtype"] == "bfloat16" for r in rows)
    assert isinstance(model[0], QLinear) and "kernel=" in repr(model[0])


def test_inspect_names_the_kernel_of_each_checkpoint_linear(tmp_path):
    import json

    from safetensors.torch import save_file

    from quantkit.inspect import inspect_checkpoint

    groups = {
        "w8a8": {"targets": ["re:.*proj_a$"], "format": "int-quantized",
                 "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
                 "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}},
        "nvfp4": {"targets": ["re:.*proj_b$"], "format": "nvfp4-pack-quantized",
                  "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}},
    }
    config = {"model_type": "llama", "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "compressed-tensors", "config_groups": groups}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({
        "m.proj_a.weight": torch.zeros(64, 96, dtype=torch.int8),
        "m.proj_a.weight_scale": torch.ones(64, 1, dtype=torch.bfloat16),
        "m.proj_b.weight_packed": torch.zeros(32, 48, dtype=torch.uint8),
        "m.proj_b.weight_scale": torch.ones(32, 6).to(torch.float8_e4m3fn),
        "m.proj_b.weight_global_scale": torch.ones(1),
    }, str(tmp_path / "model.safetensors"))
    info = inspect_checkpoint(tmp_path)
    here = Device.of("cpu")
    by_module = {k["module"]: k for k in info["kernels"]}
    assert by_module["m.proj_a"]["kernel"] == choose("int8", "int8", "real", (64, 96), here, BF16).label
    assert by_module["m.proj_b"]["kernel"] == choose("nvfp4", None, "real", (32, 96), here, BF16).label
    assert by_module["m.proj_b"]["format"] == "nvfp4" and by_module["m.proj_b"]["reason"]
    assert sum(info["extra"]["kernels on this machine (quantkit runtime, cpu)"].values()) == 2


def test_scratch_first_used_under_inference_mode_serves_later_no_grad_forwards():
    """The shared tile buffer was an inference tensor when inference_mode allocated it first, and a
    later forward under no_grad failed with 'Inplace update to inference tensor outside InferenceMode'."""
    tiled.release_scratch()
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    q = quantize_linear(lin, "int4_ch", mode="real", act_format="int8")
    x = torch.randn(5, 64)
    with torch.inference_mode():
        first = q(x)
    with torch.no_grad():
        again = q(x)
    assert torch.equal(first, again)
