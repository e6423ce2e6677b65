"""compressed-tensors codecs for quantkit's 4-bit formats.

Per format name, ``CODECS[name]`` has:
  ct_format: the compressed-tensors format string of the config group;
  to_ct(qt) -> {suffix: tensor}: the module's tensors as compressed-tensors writes them;
  from_ct(tensors, shape) -> QTensor: the inverse;
  scheme(fmt_name, act_format=None, targets=("Linear",)) -> dict: the config group, serialized by
  compressed-tensors itself from llm-compressor's presets NVFP4, NVFP4A16, MXFP4, MXFP4A16, W4A16.

Tensors (``<m>.`` prefix left to the writer):
  nvfp4  weight_packed uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16],
         weight_global_scale fp32 [1]  (input_global_scale [1] is the writer's, from QLinear)
  mxfp4  weight_packed uint8 [out, in/2], weight_scale uint8 [out, in/32] (biased E8M0)
  int4   weight_packed int32 [out, in/8] (LSB-first nibbles of q+8), weight_scale [out, in/group]
         in the weight dtype, weight_shape int64 [2]                      (``pack-quantized``)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from quantkit.errors import FormatError
from quantkit.formats.base import QTensor
from quantkit.formats.int4 import CHANNEL, INT4_GROUPS

NVFP4_CT = "nvfp4-pack-quantized"
MXFP4_CT = "mxfp4-pack-quantized"
INT4_CT = "pack-quantized"
MX_NAMES = ("mxfp4", "mxfp4_floor", "mxfp4_even", "mxfp4_rceil", "mxfp4_ceil")


class Codec(NamedTuple):
    ct_format: str
    to_ct: Callable[[QTensor], dict[str, torch.Tensor]]
    from_ct: Callable[[dict[str, torch.Tensor], tuple[int, ...]], QTensor]
    scheme: Callable[..., dict[str, Any]]


def _shape(shape) -> tuple[int, int]:
    out, inp = (int(s) for s in shape)
    return out, inp


# -- NVFP4 ------------------------------------------------------------------------------------
def nvfp4_to_ct(qt: QTensor) -> dict[str, torch.Tensor]:
    return {
        "weight_packed": qt.codes,
        "weight_scale": qt.scale.to(torch.float8_e4m3fn),
        "weight_global_scale": qt.global_scale.float().reshape(1),
    }


def nvfp4_from_ct(tensors: dict[str, torch.Tensor], shape) -> QTensor:
    return QTensor("nvfp4", tensors["weight_packed"], tensors["weight_scale"].to(torch.float8_e4m3fn),
                   _shape(shape), tensors["weight_global_scale"].float().reshape(1))


# -- MXFP4 ------------------------------------------------------------------------------------
def mxfp4_to_ct(qt: QTensor) -> dict[str, torch.Tensor]:
    return {"weight_packed": qt.codes, "weight_scale": qt.scale.to(torch.uint8)}


def mxfp4_from_ct(tensors: dict[str, torch.Tensor], shape) -> QTensor:
    # the exponent rule only matters when quantizing; any rule's checkpoint decodes the same way
    return QTensor("mxfp4", tensors["weight_packed"], tensors["weight_scale"].to(torch.uint8), _shape(shape))


# -- INT4 pack-quantized ----------------------------------------------------------------------
def int4_to_ct(qt: QTensor) -> dict[str, torch.Tensor]:
    out, inp = qt.shape
    if inp % 8:
        raise FormatError(f"{qt.format}: pack-quantized needs the input dim to be a multiple of 8, got {inp}")
    # our bytes hold element 2j in the low nibble; little-endian int32 words then hold element
    # 8i+k at bits 4k..4k+3, which is compressed-tensors' LSB-first pack_to_int32
    packed = qt.codes.contiguous().view(torch.int32)
    if not _little_endian():
        raise FormatError("pack-quantized export needs a little-endian host")
    return {"weight_packed": packed, "weight_scale": qt.scale, "weight_shape": torch.tensor([out, inp])}


def int4_from_ct(tensors: dict[str, torch.Tensor], shape) -> QTensor:
    out, inp = _shape(shape)
    scale = tensors["weight_scale"]
    n_groups = scale.reshape(out, -1).shape[1]
    group = CHANNEL if n_groups == 1 else inp // n_groups
    names = {g: n for n, g in INT4_GROUPS.items()}
    if group not in names:
        raise FormatError(f"int4 group size {group} has no quantkit format; known: {sorted(INT4_GROUPS)}")
    codes = tensors["weight_packed"].contiguous().view(torch.uint8)
    return QTensor(names[group], codes, scale.reshape(out, n_groups), (out, inp), None, {"group": group})


def _little_endian() -> bool:
    return torch.tensor([1], dtype=torch.int32).view(torch.uint8)[0].item() == 1


# -- config groups ----------------------------------------------------------------------------
def _preset(fmt_name: str, act_format: str | None) -> tuple[str, str]:
    """(compressed-tensors preset name, ct_format) for a weight/activation format pair."""
    if fmt_name == "nvfp4":
        if act_format in (None, "nvfp4"):
            return ("NVFP4" if act_format else "NVFP4A16"), NVFP4_CT
    elif fmt_name in MX_NAMES:
        if act_format is None or act_format in MX_NAMES:
            return ("MXFP4" if act_format else "MXFP4A16"), MXFP4_CT
    elif fmt_name in INT4_GROUPS:
        if act_format is None:
            return "W4A16", INT4_CT
    else:
        raise FormatError(f"no compressed-tensors codec for format {fmt_name!r}")
    raise FormatError(f"compressed-tensors has no preset for weights {fmt_name} with activations {act_format}")


def scheme(fmt_name: str, act_format: str | None = None, targets: tuple[str, ...] = ("Linear",)) -> dict[str, Any]:
    """The ``config_groups`` entry for these formats, as llm-compressor writes its preset."""
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme

    preset, ct_format = _preset(fmt_name, act_format)
    s = preset_name_to_scheme(preset, list(targets))
    if fmt_name in INT4_GROUPS:  # W4A16 is group 128; state the group this format really uses
        group = INT4_GROUPS[fmt_name]
        if group == CHANNEL:
            s.weights.strategy, s.weights.group_size = QuantizationStrategy.CHANNEL, None
        else:
            s.weights.group_size = group
    s.format = ct_format
    return s.model_dump(mode="json")


def _codec(ct_format: str, to_ct, from_ct) -> Codec:
    return Codec(ct_format, to_ct, from_ct, scheme)


CODECS: dict[str, Codec] = {
    "nvfp4": _codec(NVFP4_CT, nvfp4_to_ct, nvfp4_from_ct),
    **{name: _codec(MXFP4_CT, mxfp4_to_ct, mxfp4_from_ct) for name in MX_NAMES},
    **{name: _codec(INT4_CT, int4_to_ct, int4_from_ct) for name in INT4_GROUPS},
}
