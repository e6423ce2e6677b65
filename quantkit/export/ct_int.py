"""compressed-tensors codecs for integer weights (int8 per channel).

W8A8 (int8 weights + dynamic per-token int8 activations) -> ``int-quantized``: ``weight`` int8
[out, in] and ``weight_scale`` [out, 1] in the weight's dtype. Weight-only int8 ->
``pack-quantized``: ``weight_packed`` int32 (compressed-tensors' own packer), ``weight_scale``,
``weight_shape``; this is the layout vLLM's WNA16 kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from quantkit.formats.base import QTensor


@dataclass(frozen=True)
class Int8Codec:
    name: str = "int8"

    def ct_format(self, act_format: str | None) -> str:
        return "int-quantized" if act_format == "int8" else "pack-quantized"

    def weight_args(self, qt: QTensor) -> dict:
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}

    def act_args(self, act_format: str | None) -> dict | None:
        if act_format is None:
            return None
        if act_format != "int8":
            raise ValueError(f"int8 weights with {act_format} activations have no compressed-tensors layout")
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}

    def to_ct(self, qt: QTensor, act_format: str | None) -> dict[str, torch.Tensor]:
        if act_format == "int8":
            return {"weight": qt.codes, "weight_scale": qt.scale}
        return {
            "weight_packed": pack_to_int32(qt.codes, 8),
            "weight_scale": qt.scale,
            "weight_shape": torch.tensor(qt.shape, dtype=torch.int32),
        }

    def from_ct(self, tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> QTensor:
        if "weight" in tensors:
            codes = tensors["weight"].to(torch.int8)
        else:
            codes = unpack_from_int32(tensors["weight_packed"], 8, torch.Size(shape))
        return QTensor("int8", codes, tensors["weight_scale"], tuple(shape))


CODECS = {"int8": Int8Codec()}
