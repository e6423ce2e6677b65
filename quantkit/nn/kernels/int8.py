"""INT8 kernels: W8A8 with exact int32 accumulation, W8A16 on torch's int8-weight kernel.

W8A8 arithmetic (compressed-tensors' int-quantized runtime, docs/runtime.md):
    x codes, xs = per-token round(x / (amax/127.5)) in x's dtype     [T, in], [T, 1]
    acc = x_codes @ w_codes.T, exact in int32                        [T, out]
    y   = acc * xs * w_scale (* output_scale) + bias, in fp32, then x's dtype
Every path below produces the same exact ``acc``, so they agree bit for bit.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from quantkit.formats.int8 import CT_INT8_DIVISOR, INT8_MAX, INT8_MIN, symmetric_int_scale

# fp32 represents every integer up to 2**24 exactly; |code product| <= 128 * 128 = 2**14, so a dot
# product of up to 2**10 terms (any partial sum, in any order) is an exact integer in fp32
EXACT_F32_K = 1024
INT_MM_MIN_ROWS = 17  # torch._int_mm wants more than 16 rows (CUDA); shorter inputs are padded
COMPILE_ENV = "QUANTKIT_COMPILE"  # "1": fuse the activation quantization with torch.compile


def act_codes(x: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes of x [T, in] as out_dtype (exact integers), scale [T, 1] in x.dtype.

    Same values as formats.int8.quantize_rows (division and rounding in x's dtype).
    """
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = symmetric_int_scale(amax, CT_INT8_DIVISOR)
    q = torch.round(x / scale).clamp_(INT8_MIN, INT8_MAX)
    return q.to(out_dtype), scale


_compiled: dict[torch.dtype, object] = {}
compile_failed: list[str] = []  # why compile was abandoned, for the kernel report


def quantize_activations(x: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """act_codes, fused by torch.compile when QUANTKIT_COMPILE=1 (eager otherwise or on failure).

    Off by default, and not the reference numerics (docs/runtime.md, bench/results/runtime.md):
    inductor divides bf16 activations in fp32 instead of in bf16, so about 8% of the codes differ
    by one from compressed-tensors' arithmetic, and on this project's CPU the compiled layer was
    no faster (0.55-1.02x of eager) after a first compile of minutes.
    """
    if os.environ.get(COMPILE_ENV) != "1" or compile_failed:
        return act_codes(x, out_dtype)
    try:
        fn = _compiled.get(out_dtype)
        if fn is None:
            fn = _compiled[out_dtype] = torch.compile(lambda t: act_codes(t, out_dtype), dynamic=True)
        return fn(x)
    except Exception as exc:  # noqa: BLE001 - no compiler toolchain, unsupported backend: stay eager
        compile_failed.append(f"{type(exc).__name__}: {exc}"[:200])
        return act_codes(x, out_dtype)


def exact_in_one_pass(wq: torch.Tensor) -> bool:
    """Whether one fp32 GEMM over all of in_features is exact for any int8 activation codes.

    Every partial sum of a row's dot product is bounded by 128 * sum_k |w_k| (|x code| <= 128), so
    if that bound stays within 2**24 for every row, fp32 holds every partial sum exactly whatever
    the summation order. Holds for typical weights far beyond EXACT_F32_K (SmolLM2's down_proj).
    """
    worst = 0
    for r0 in range(0, wq.shape[0], 1024):  # int32 copy of 1024 rows at a time, not of the weight
        l1 = wq[r0 : r0 + 1024].to(torch.int32).abs().sum(dim=1)  # widen first: int8 |-128| wraps
        worst = max(worst, int(l1.max()))
    return worst * 128 <= 2**24


def int_gemm_exact_f32(xq: torch.Tensor, wq: torch.Tensor, tile_rows: int, one_pass: bool = False) -> torch.Tensor:
    """xq [T, in] fp32 integer codes @ wq [out, in] int8 .T -> [T, out] exact integer sums.

    The weight codes are widened to fp32 one [tile_rows, in] row tile at a time (the scratch).
    With in_features <= EXACT_F32_K, or ``one_pass`` (exact_in_one_pass), the fp32 result is
    returned as is: every value an exact integer below 2**24. Otherwise rows are multiplied in
    K-chunks of EXACT_F32_K and the chunk results added in int32, exact for any length.
    """
    out_f, in_f = wq.shape
    if in_f <= EXACT_F32_K or one_pass:
        if out_f <= tile_rows:
            return xq @ wq.to(torch.float32).t()
        out = torch.empty(xq.shape[0], out_f, dtype=torch.float32, device=xq.device)
        for r0 in range(0, out_f, tile_rows):
            r1 = min(out_f, r0 + tile_rows)
            out[:, r0:r1] = xq @ wq[r0:r1].to(torch.float32).t()
        return out
    acc = torch.zeros(xq.shape[0], out_f, dtype=torch.int32, device=xq.device)
    for r0 in range(0, out_f, tile_rows):
        r1 = min(out_f, r0 + tile_rows)
        wt = wq[r0:r1].to(torch.float32)  # [rows, in] scratch, one contiguous widening
        for k0 in range(0, in_f, EXACT_F32_K):
            k1 = min(in_f, k0 + EXACT_F32_K)
            acc[:, r0:r1] += (xq[:, k0:k1] @ wt[:, k0:k1].t()).to(torch.int32)  # exact: see EXACT_F32_K
    return acc


def int_gemm_int_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq [T, in] int8 @ wq [out, in] int8 .T -> int32 [T, out] with torch._int_mm."""
    rows = xq.shape[0]
    if rows < INT_MM_MIN_ROWS:
        xq = F.pad(xq, (0, 0, 0, INT_MM_MIN_ROWS - rows))
    return torch._int_mm(xq, wq.t())[:rows]


def w8a8_epilogue(
    acc: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
) -> torch.Tensor:
    """acc [T, out] exact integer sums (int32 or fp32) -> y [T, out] in dtype.

    y = acc * xs * ws (+ bias) in fp32, in that order, then one rounding. ws [1, out] fp32 is the
    weight scale times any output_scale (w8a8_scales).
    """
    y = acc.to(torch.float32) if acc.dtype != torch.float32 else acc
    y.mul_(xs.to(torch.float32)).mul_(ws)
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(dtype)


def w8a8_scales(w_scale: torch.Tensor, output_scale: torch.Tensor | None) -> torch.Tensor:
    """[1, out] fp32 weight scale (times output_scale, in fp32): cached by QLinear."""
    ws = w_scale.reshape(1, -1).to(torch.float32)
    return ws * output_scale.reshape(1, -1) if output_scale is not None else ws


def w8a8_linear(x: torch.Tensor, module, kernel: str, tile_rows: int, ws: torch.Tensor,
                one_pass: bool = False) -> torch.Tensor:
    """x [T, in] -> [T, out] for an int8-weight, int8-activation QLinear."""
    if kernel == "int_mm":
        xq, xs = quantize_activations(x, torch.int8)
        acc = int_gemm_int_mm(xq, module.weight_codes)
    else:
        xq, xs = quantize_activations(x, torch.float32)
        acc = int_gemm_exact_f32(xq, module.weight_codes, tile_rows, one_pass)
    return w8a8_epilogue(acc, xs, ws, module.bias, x.dtype)


def w8a16_linear(x: torch.Tensor, module, scales_bf16: torch.Tensor) -> torch.Tensor:
    """x [T, in] bf16 @ (codes * scale).T via _weight_int8pack_mm -> [T, out] bf16."""
    y = torch.ops.aten._weight_int8pack_mm(x, module.weight_codes, scales_bf16)
    if module.output_scale is not None:
        y = y * module.output_scale.to(y.dtype)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y
