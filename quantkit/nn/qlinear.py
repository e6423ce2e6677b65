"""QLinear: a Linear whose weight is a QTensor.

mode "fake": the dequantized weight is cached densely (accuracy studies, fast forward).
mode "real": only codes and scales are held; forward dequantizes block-wise, or for int8
weights with int8 activations runs an int8 x int8 -> int32 matmul (torch._int_mm).
The QTensor is kept in both modes so export writes the exact codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import get_format
from quantkit.formats.base import QTensor
from quantkit.formats.int8 import quantize_rows

_HAS_INT_MM = hasattr(torch, "_int_mm")


class QLinear(nn.Module):
    def __init__(
        self,
        qweight: QTensor,
        bias: torch.Tensor | None,
        *,
        mode: str = "real",
        act_format: str | None = None,
        input_global_scale: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.weight_format = qweight.format
        self.mode = mode
        self.act_format = act_format
        self.compute_dtype = compute_dtype
        self.qmeta = dict(qweight.meta)
        self.register_buffer("weight_codes", qweight.codes)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("weight_global_scale", qweight.global_scale)
        self.register_buffer("input_global_scale", input_global_scale)
        # optional exact per-output-row multiplier (folded corrections such as ATM/OHB)
        self.register_buffer("output_scale", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._dense: torch.Tensor | None = None
        if mode == "fake":
            self._dense = self.dequantized_weight(compute_dtype)

    @property
    def qweight(self) -> QTensor:
        return QTensor(
            self.weight_format,
            self.weight_codes,
            self.weight_scale,
            (self.out_features, self.in_features),
            self.weight_global_scale,
            dict(self.qmeta),
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = get_format(self.weight_format).dequantize(self.qweight, dtype)
        if self.output_scale is not None:
            w = w * self.output_scale.to(dtype)[:, None]
        return w

    def set_output_scale(self, scale: torch.Tensor) -> None:
        """Multiply output rows by scale [out] exactly, without touching the codes."""
        prev = self.output_scale if self.output_scale is not None else torch.ones_like(scale, dtype=torch.float32)
        self.output_scale = (prev * scale.float()).to(self.weight_codes.device)
        if self.mode == "fake":
            self._dense = self.dequantized_weight(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # .to()/.float()/.cuda(): rebuild the dense cache from the codes in the new dtype rather
        # than casting it, so a bf16 cache never leaks bf16 rounding into an fp32 model
        super()._apply(fn, recurse)
        if self._dense is not None:
            probe = fn(torch.zeros(1, dtype=self.compute_dtype, device=self._dense.device))
            self.compute_dtype = probe.dtype
            self._dense = self.dequantized_weight(self.compute_dtype).to(probe.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.weight_format == "int8" and self.act_format == "int8" and self.mode == "real" and _HAS_INT_MM:
            return self._int8_forward(x)
        if self.act_format is not None:
            x = get_format(self.act_format).fake_activation(x, self.input_global_scale)
        w = self._dense if self._dense is not None else self.dequantized_weight(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, w.to(dtype), bias)

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        xq, xs = quantize_rows(flat)  # [T, in] int8, [T, 1]
        rows = flat.shape[0]
        if rows <= 16:  # _int_mm wants more than 16 rows on some backends; pad
            xq = F.pad(xq, (0, 0, 0, 17 - rows))
        acc = torch._int_mm(xq, self.weight_codes.t())[:rows]  # [T, out] int32, exact accumulation
        ws = self.weight_scale.reshape(1, -1).to(torch.float32)
        if self.output_scale is not None:
            ws = ws * self.output_scale.reshape(1, -1)
        y = acc.to(torch.float32) * xs.to(torch.float32) * ws
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, weight={self.weight_format}, "
            f"act={self.act_format}, mode={self.mode}"
        )


def quantize_linear(
    linear: nn.Linear,
    weight_format: str,
    *,
    mode: str = "real",
    act_format: str | None = None,
    global_scale: torch.Tensor | None = None,
    input_global_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> QLinear:
    """Build a QLinear from an nn.Linear (the Linear itself is not modified)."""
    from quantkit.targets import Conv1D, linear_weight

    fmt = get_format(weight_format)
    qw = fmt.quantize(linear_weight(linear).detach().contiguous(), global_scale=global_scale)
    if Conv1D and isinstance(linear, Conv1D):
        qw.meta["conv1d"] = True  # GPT-2 layout: the checkpoint writer must know
    return QLinear(
        qw,
        linear.bias,
        mode=mode,
        act_format=act_format,
        input_global_scale=input_global_scale,
        compute_dtype=compute_dtype or linear.weight.dtype,
    )
