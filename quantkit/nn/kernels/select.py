"""Which kernel a real-mode QLinear runs, and why: pure logic over (format, activations, device).

One function serves CPU and CUDA so the routing is tested on a CPU-only machine: the device's
capabilities come in as a plain ``Device`` record, never queried inside ``choose``.
"""

from __future__ import annotations

import functools
import os

from dataclasses import dataclass

import torch

from quantkit.formats import get_format

INT4_CPU_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel accepts
INT4_CPU_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0
INT_MM_CUDA_MULTIPLE = 8  # torch._int_mm on CUDA: K and N multiples of 8
FP4_SCALED_MM_CAPABILITY = (10, 0)  # block-scaled FP4 MMA: Blackwell (sm_100) and newer
# From this many input rows a CPU without native bf16 GEMM (AVX2: bf16 GEMM ran 7x slower than
# fp32 at 512 rows in bench/results/runtime.md) dequantizes tiles and multiplies in fp32; below it
# torch's int8/int4 weight-only kernels (memory-bound GEMV) win. Crossover measured near 16-32 rows.
FP32_PREFILL_ROWS = 16
# opt-in FP4 W4A16 decode on torch's INT4 kernel (fp4_int4.py): "int4x2". Off by default: its
# converted codes take twice the packed bytes, over the "packed size + one tile" memory budget
FP4_DECODE_ENV = "QUANTKIT_FP4_DECODE"
FP4_INT4X2_DTYPES = (torch.bfloat16, torch.float32)  # fp16's range could overflow the d/2 table


@dataclass(frozen=True)
class Device:
    """What the chooser needs to know about a device."""

    type: str  # "cpu" or "cuda"
    vnni: bool = False  # CPU: AVX512-VNNI/AMX, where oneDNN runs _int_mm as a real int8 GEMM
    bf16_gemm: bool = True  # CPU: AVX512-BF16/AMX, bf16 GEMM at full speed; AVX2 converts on the fly
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability

    @staticmethod
    def of(device: torch.device | str) -> Device:
        device = torch.device(device)
        if device.type == "cuda":
            return Device("cuda", capability=torch.cuda.get_device_capability(device))
        if device.type == "cpu":
            return Device("cpu", vnni=_cpu_vnni(), bf16_gemm=_cpu_bf16())
        return Device(device.type)


@functools.cache  # a CPU's instruction set does not change while the process runs; callers ask per forward
def _cpu_vnni() -> bool:
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


@functools.cache
def _cpu_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


@dataclass(frozen=True)
class Choice:
    """A kernel name (stable, for reports and tests) and a one-line reason (for people).

    ``prefill``: the kernel used instead from ``prefill_rows`` input rows on (None: always ``name``).
    """

    name: str
    reason: str
    prefill: str | None = None
    prefill_rows: int = 0

    @property
    def label(self) -> str:
        return self.name if self.prefill is None else f"{self.name} (<{self.prefill_rows} rows), {self.prefill}"

    def for_rows(self, rows: int) -> str:
        return self.prefill if self.prefill is not None and rows >= self.prefill_rows else self.name


def _with_fp32_prefill(choice: Choice, device: Device, compute_dtype: torch.dtype) -> Choice:
    if device.type != "cpu" or device.bf16_gemm or compute_dtype != torch.bfloat16:
        return choice
    return Choice(choice.name, choice.reason + f"; from {FP32_PREFILL_ROWS} rows tiles are multiplied in fp32 "
                  "(this CPU has no native bf16 GEMM)", "tiled_f32", FP32_PREFILL_ROWS)


def _int4_group(weight_format: str, in_features: int, group: int | None) -> int:
    if group is None:  # "int4" family: group 0 means one scale per row
        return 0
    return group or in_features


def choose(
    weight_format: str,
    act_format: str | None,
    mode: str,
    shape: tuple[int, int],
    device: Device,
    compute_dtype: torch.dtype,
    group: int | None = None,
    fp4_int4x2: bool | None = None,
) -> Choice:
    """The kernel for a QLinear of ``shape`` (out, in) whose inputs arrive in ``compute_dtype``.

    fp4_int4x2: FP4 weight-only decode on the INT4 kernel (opt-in); None reads FP4_DECODE_ENV, so
    QLinear and `quantkit inspect` agree.
    """
    if fp4_int4x2 is None:
        fp4_int4x2 = os.environ.get(FP4_DECODE_ENV) == "int4x2"
    choice = _choose(weight_format, act_format, mode, shape, device, compute_dtype, group, fp4_int4x2)
    if choice.name in ("tiled_dequant", "int8pack_mm", "int4pack_mm", "fake_act_tiled", "fp4_int4x2"):
        return _with_fp32_prefill(choice, device, compute_dtype)
    return choice


def _choose(
    weight_format: str,
    act_format: str | None,
    mode: str,
    shape: tuple[int, int],
    device: Device,
    compute_dtype: torch.dtype,
    group: int | None = None,
    fp4_int4x2: bool = False,
) -> Choice:
    out_f, in_f = shape
    if mode == "fake":
        return Choice("dense", "fake mode: the dequantized weight is cached, plain F.linear")
    fp4 = weight_format in ("nvfp4", "mxfp4") or weight_format.startswith("mxfp4_")
    if weight_format == "int8" and act_format == "int8":
        if device.type == "cuda":
            if out_f % INT_MM_CUDA_MULTIPLE == 0 and in_f % INT_MM_CUDA_MULTIPLE == 0:
                return Choice("int_mm", "CUDA: torch._int_mm, int8 x int8 -> int32 on tensor cores")
            return Choice("int8_exact_f32", f"CUDA _int_mm needs in/out multiples of {INT_MM_CUDA_MULTIPLE}")
        if device.vnni:
            return Choice("int_mm", "CPU has VNNI/AMX: torch._int_mm runs oneDNN's u8s8 int8 GEMM")
        return Choice(
            "int8_exact_f32",
            "CPU without VNNI: torch._int_mm is a scalar loop here; integer codes multiply exactly on "
            "the fp32 GEMM in K-chunks of 1024 (every partial sum < 2**24)",
        )
    if act_format is not None:
        if fp4 and act_format == weight_format and device.type == "cuda" and device.capability >= FP4_SCALED_MM_CAPABILITY:
            return Choice(f"scaled_mm_{act_format[:5]}", "CUDA sm_100+: torch._scaled_mm with FP4 block scales")
        return Choice(
            "fake_act_tiled",
            f"{act_format} activations are fake-quantized (no {device.type} kernel multiplies them packed); "
            "weight dequantized tile by tile",
        )
    if weight_format == "int8":
        if device.type == "cpu" and compute_dtype == torch.bfloat16:
            return Choice("int8pack_mm", "CPU bf16: torch _weight_int8pack_mm (int8 weight, per-row scale)")
        return Choice("tiled_dequant", f"{device.type} {compute_dtype}: no int8 weight-only kernel; tile dequant")
    if weight_format.startswith("int4"):
        g = _int4_group(weight_format, in_f, group)
        if device.type != "cpu":
            return Choice("tiled_dequant", "int4 on CUDA: tinygemm's layout is not wired; tile dequant")
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return Choice("tiled_dequant", f"{compute_dtype} inputs: tile dequant")
        if g not in INT4_CPU_GROUPS:
            return Choice("tiled_dequant", f"group {g} is not one of {INT4_CPU_GROUPS} that torch's int4 kernel takes")
        if out_f % INT4_CPU_N_MULTIPLE:
            return Choice("tiled_dequant", f"out_features {out_f} is not a multiple of {INT4_CPU_N_MULTIPLE}")
        return Choice("int4pack_mm", f"CPU: torch _weight_int4pack_mm_for_cpu, group {g}")
    if fp4 and fp4_int4x2 and device.type == "cpu":
        why = _int4x2_refusal(weight_format, out_f, compute_dtype)
        if why is None:
            return Choice("fp4_int4x2", f"{FP4_DECODE_ENV}=int4x2: E2M1 x 2 split into two INT4 halves, "
                          "torch _weight_int4pack_mm_for_cpu over 2x the inputs (codes held at 2x the packed size)")
        return Choice("tiled_dequant", f"{FP4_DECODE_ENV}=int4x2 refused: {why}; dequantized tile by tile")
    if fp4:
        return Choice(
            "tiled_dequant",
            "FP4 weight-only: no CPU/CUDA kernel takes E2M1 with bf16 activations; dequantized tile by tile "
            "into one shared scratch buffer",
        )
    return Choice("tiled_dequant", f"{weight_format}: generic dequantize tile by tile")


def _int4x2_refusal(weight_format: str, out_f: int, compute_dtype: torch.dtype) -> str | None:
    """Why the int4x2 FP4 route cannot take this layer, or None."""
    group = 2 * get_format(weight_format).block
    if group not in INT4_CPU_GROUPS:
        return f"block {group // 2} gives INT4 group {group}, not one of {INT4_CPU_GROUPS}"
    if out_f % INT4_CPU_N_MULTIPLE:
        return f"out_features {out_f} is not a multiple of {INT4_CPU_N_MULTIPLE}"
    if compute_dtype not in FP4_INT4X2_DTYPES:
        return f"{compute_dtype} inputs"
    return None
