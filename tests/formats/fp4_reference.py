"""Reference quantizers built from compressed-tensors' (and torchao's) own functions.

They reproduce what llm-compressor does for a Linear: observe min/max in the weight's dtype,
``generate_gparam`` / ``calculate_qparams``, then the compressor's ``compress``.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

try:  # torchao is an optional test dependency; its tests skip without it
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    HAS_TORCHAO = True
except Exception:  # noqa: BLE001 - any import failure (missing, ABI mismatch) means "skip"
    HAS_TORCHAO = False


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    return w.unflatten(-1, (w.shape[-1] // g, g))


def ct_nvfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    gs = generate_gparam(w.amin(), w.amax())
    wg = _groups(w, 16)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), scheme.weights, global_scale=gs)
    sd = {"weight": w, "weight_scale": scale, "weight_global_scale": gs, "weight_zero_point": zp}
    return NVFP4PackedCompressor.compress(sd, scheme)


def ct_mxfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    scheme = preset_name_to_scheme("MXFP4A16", ["Linear"])
    wg = _groups(w, 32)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), scheme.weights)
    sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
    return MXFP4PackedCompressor.compress(sd, scheme)


def ct_int4(w: torch.Tensor, group: int | None) -> dict[str, torch.Tensor]:
    """compressed-tensors symmetric int4 (W4A16 arithmetic), per group or per channel."""
    if group:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
        wg = _groups(w, group)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    else:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")
        scale, zp = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), args)
    q = quantize(w, scale, zp, args, dtype=torch.int8)
    return {"weight_packed": pack_to_int32(q, 4), "weight_scale": scale, "q": q}


def normalize_neg_zero(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors 0.20's CPU packer writes -0 as code 8; 0.19 (and quantkit) write 0."""
    lo, hi = packed & 0xF, packed >> 4
    lo = torch.where(lo == 8, torch.zeros_like(lo), lo)
    hi = torch.where(hi == 8, torch.zeros_like(hi), hi)
    return lo | (hi << 4)


def torchao_mxfp4(w: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased exponents uint8 [rows, nb], packed codes uint8 [rows, cols/2]) from torchao to_mx."""
    mode = {"floor": ScaleCalculationMode.FLOOR, "even": ScaleCalculationMode.EVEN,
            "ceil": ScaleCalculationMode.CEIL, "rceil": ScaleCalculationMode.RCEIL}[rule]
    scale, data = to_mx(w.contiguous(), torch.float4_e2m1fn_x2, 32, scaling_mode=mode)
    return scale.view(torch.uint8).reshape(w.shape[0], -1), data.view(torch.uint8).reshape(w.shape[0], -1)


def edge_weight(dtype: torch.dtype, rows: int = 16, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Random weight with the edge cases that the spec's verification used, one per row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0.0  # all-zero blocks
    w[1, :4] = torch.tensor([-0.0, -1e-9, 0.0, 1e-9])  # negative zero, tiny values
    w[2] *= 1e-36  # tiny row (fp32 subnormal after scaling for bf16/fp32)
    w[3] *= 1e30  # huge row
    w[4, :32] = 1e-6
    w[4, 5] = 3.0  # a single outlier among tiny values
    w[5, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)  # exact E2M1 ties
    w[6, :] = 0.3  # constant blocks
    w[7, :32] = -w[7, :32].abs()  # one-signed block
    return w.to(dtype)
