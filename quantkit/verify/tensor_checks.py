"""Tensor checks: names, shapes and dtypes per scheme; scale values; fused global scales.

Reads only scales (1/16 of the weights at most), never the packed weights themselves.
"""

from __future__ import annotations

import math

import torch

from quantkit.threads import single_thread
from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.config_checks import Plan
from quantkit.verify.result import VerifyResult
from quantkit.verify.schemes import Scheme

FLOAT_DTYPES = ("F32", "BF16", "F16")
E4M3_NAN = 0x7F  # E4M3 (fn) has no Inf; S.1111.111 is NaN, i.e. bytes 0x7F and 0xFF
E8M0_NAN = 255  # E8M0 exponent byte 255 is NaN


def _expected(s: Scheme, fmt: str, out: int, inp: int) -> dict[str, tuple[tuple[str, ...], tuple | None]]:
    """suffix -> (allowed dtypes, shape or None when several are valid) of one quantized Linear."""
    w, group = s.weights, s.weights.get("group_size")
    if s.name.startswith("NVFP4"):
        t = {"weight_packed": (("U8",), (out, inp // 2)), "weight_scale": (("F8_E4M3",), (out, inp // 16)),
             "weight_global_scale": (("F32",), (1,))}
        if s.static_input_scale:
            t["input_global_scale"] = (("F32",), (1,))
        return t
    if s.name.startswith("MXFP4"):
        return {"weight_packed": (("U8",), (out, inp // 2)), "weight_scale": (("U8",), (out, inp // 32))}
    scale_shape = (out, inp // group) if w.get("strategy") == "group" and group else None
    if fmt == "pack-quantized":
        bits = w["num_bits"]
        t = {"weight_packed": (("I32",), (out, math.ceil(inp * bits / 32))),
             "weight_scale": (FLOAT_DTYPES, scale_shape), "weight_shape": (("I32", "I64"), (2,))}
    else:
        wdt = ("F8_E4M3",) if w.get("type") == "float" else ("I8",)
        t = {"weight": (wdt, (out, inp)), "weight_scale": (FLOAT_DTYPES, scale_shape)}
    if not w.get("symmetric", True):
        t["weight_zero_point"] = (("I8", "I32") + FLOAT_DTYPES, None)
    if s.static_input_scale:
        t["input_scale"] = (FLOAT_DTYPES, None)
        if s.acts and not s.acts.get("symmetric", True):
            t["input_zero_point"] = (("I8", "I32") + FLOAT_DTYPES, None)
    return t


def check_tensors(ckpt: Checkpoint, result: VerifyResult, plan: Plan) -> None:
    # per-layer scale tensors are small: torch's intra-op thread pool costs more than it saves, most
    # of all on a loaded machine (measured 100x slower with 2 threads at load average 12)
    with single_thread():
        _check_tensors(ckpt, result, plan)


def _check_tensors(ckpt: Checkpoint, result: VerifyResult, plan: Plan) -> None:
    for name, gid in plan.quantized.items():
        mod, s = ckpt.modules[name], plan.schemes[gid]
        if mod.in_features is None or mod.out_features is None:
            result.warn("tensors.shape", "in/out features unknown; shapes not checked", name)
            continue
        fmt = plan.formats.get(gid) or ""
        for suffix, (dtypes, shape) in _expected(s, fmt, mod.out_features, mod.in_features).items():
            key = f"{name}.{suffix}"
            if not ckpt.has(key):
                what = "static activation scheme without its input scale: " if suffix.startswith("input_") else ""
                result.error("tensors.missing", f"{what}{s.name} needs {suffix}, which is missing", name)
                continue
            info = ckpt.tensors[key]
            if info.dtype not in dtypes:
                result.error("tensors.dtype", f"{suffix} is {info.dtype}, {s.name} stores {' or '.join(dtypes)}", name)
            if shape is not None and tuple(info.shape) != shape:
                result.error("tensors.shape", f"{suffix} has shape {list(info.shape)}, expected {list(shape)}", name)
        if fmt == "pack-quantized" and ckpt.has(f"{name}.weight_shape"):
            stored = [int(v) for v in ckpt.get(f"{name}.weight_shape").tolist()]
            if stored != [mod.out_features, mod.in_features]:
                result.error("tensors.shape", f"weight_shape is {stored}, the layer is "
                             f"[{mod.out_features}, {mod.in_features}]", name)
        if "weight_packed" in _expected(s, fmt, mod.out_features, mod.in_features) and ckpt.has(f"{name}.weight"):
            result.error("tensors.extra", "has both a dense weight and weight_packed", name)
        _check_scale_values(ckpt, result, name, s)
    _check_fused_global_scales(ckpt, result, plan)


def _bad_float(t: torch.Tensor) -> str | None:
    t = t.float()
    if not torch.isfinite(t).all():
        return f"{int((~torch.isfinite(t)).sum())} NaN/Inf value(s)"
    if (t <= 0).any():
        return f"{int((t <= 0).sum())} value(s) <= 0"
    return None


def _check_scale_values(ckpt: Checkpoint, result: VerifyResult, name: str, s: Scheme) -> None:
    for suffix in ("weight_global_scale", "input_global_scale", "input_scale"):
        key = f"{name}.{suffix}"
        if ckpt.has(key) and ckpt.tensors[key].dtype in FLOAT_DTYPES:
            bad = _bad_float(ckpt.get(key))
            if bad:
                result.error("tensors.scale", f"{suffix} must be finite and positive: {bad}", name)
    key = f"{name}.weight_scale"
    if not ckpt.has(key):
        return
    dtype = ckpt.tensors[key].dtype
    t = ckpt.get(key)
    if dtype == "F8_E4M3":
        b = t.view(torch.uint8)
        nan = int(((b & 0x7F) == E4M3_NAN).sum())
        if nan:
            result.error("tensors.scale", f"weight_scale holds {nan} E4M3 NaN code(s) (0x7F/0xFF)", name)
        neg = int(((b & 0x80) != 0).sum())
        if neg:
            result.error("tensors.scale", f"weight_scale holds {neg} negative E4M3 block scale(s)", name)
    elif dtype == "U8" and s.name.startswith("MXFP4"):
        nan = int((t == E8M0_NAN).sum())
        if nan:
            result.error("tensors.scale", f"weight_scale holds {nan} E8M0 NaN exponent(s) (255)", name)
    elif dtype in FLOAT_DTYPES:
        bad = _bad_float(t)
        if bad:
            result.error("tensors.scale", f"weight_scale must be finite and positive: {bad}", name)


def _check_fused_global_scales(ckpt: Checkpoint, result: VerifyResult, plan: Plan) -> None:
    for members in plan.fused:
        if not all(m in plan.quantized and plan.schemes[plan.quantized[m]].name.startswith("NVFP4") for m in members):
            continue
        for suffix, severity in (("weight_global_scale", "error"), ("input_global_scale", "warning")):
            keys = [f"{m}.{suffix}" for m in members]
            if not all(ckpt.has(k) for k in keys):
                continue
            vals = [float(ckpt.get(k).float().reshape(-1)[0]) for k in keys]
            if not all(math.isfinite(v) for v in vals):
                continue  # reported by the scale-value check
            if len(set(vals)) > 1:
                where = members[0].rpartition(".")[0]
                detail = ", ".join(f"{m.rpartition('.')[2]}={v:.6g}" for m, v in zip(members, vals))
                if severity == "error":
                    result.error("tensors.fused_scale", f"fused group {where} has unequal weight global scales ({detail}); "
                                 "vLLM uses one (the max) for the fused layer, which rescales the others' blocks")
                else:
                    result.warn("tensors.fused_scale", f"fused group {where} has unequal input global scales ({detail}); "
                                "vLLM uses the max for the fused layer")
