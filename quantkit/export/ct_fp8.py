"""compressed-tensors codec for FP8 weights (``float-quantized``), same protocol as ct_fp4.CODECS.

Tensors (``<m>.`` prefix left to the writer):
  weight        float8_e4m3fn [out, in]
  weight_scale  weight dtype [out, 1] (fp8, FP8_DYNAMIC) or [ceil(out/128), ceil(in/128)] (fp8_block)

Config groups are llm-compressor's presets FP8_DYNAMIC and FP8_BLOCK serialized by
compressed-tensors itself; weight-only FP8 writes the same weights with no input_activations.
"""

from __future__ import annotations

from typing import Any

import torch

from quantkit.errors import FormatError
from quantkit.export.ct_fp4 import Codec
from quantkit.formats.base import QTensor
from quantkit.formats.fp8 import FP8_DTYPE

FP8_CT = "float-quantized"
PRESETS = {"fp8": "FP8_DYNAMIC", "fp8_block": "FP8_BLOCK"}


def _to_ct(qt: QTensor) -> dict[str, torch.Tensor]:
    sdt = getattr(torch, qt.meta.get("scale_dtype", str(qt.scale.dtype).removeprefix("torch.")))
    return {"weight": qt.codes.to(FP8_DTYPE), "weight_scale": qt.scale.to(sdt)}


def _from_ct(name: str):
    def from_ct(tensors: dict[str, torch.Tensor], shape) -> QTensor:
        scale = tensors["weight_scale"]
        out, inp = (int(s) for s in shape)
        meta = {"scale_dtype": str(scale.dtype).removeprefix("torch.")}
        return QTensor(name, tensors["weight"].to(FP8_DTYPE), scale, (out, inp), None, meta)

    return from_ct


def scheme(fmt_name: str, act_format: str | None = None, targets: tuple[str, ...] = ("Linear",)) -> dict[str, Any]:
    from compressed_tensors.quantization import preset_name_to_scheme

    if fmt_name not in PRESETS:
        raise FormatError(f"no compressed-tensors FP8 preset for format {fmt_name!r}")
    if act_format not in (None, fmt_name):
        raise FormatError(f"compressed-tensors has no preset for weights {fmt_name} with activations {act_format}")
    s = preset_name_to_scheme(PRESETS[fmt_name], list(targets))
    if act_format is None:
        s.input_activations = None
    s.format = FP8_CT
    return s.model_dump(mode="json")


CODECS: dict[str, Codec] = {name: Codec(FP8_CT, _to_ct, _from_ct(name), scheme) for name in PRESETS}
