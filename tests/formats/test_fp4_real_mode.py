"""Real-mode QLinear with packed 4-bit weights: exact forward and memory against bf16."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import get_format
from quantkit.nn.qlinear import quantize_linear

LIMITS = {"nvfp4": 0.29, "mxfp4": 0.27, "int4": 0.32, "int4_g128": 0.27}


def _linear(dtype=torch.bfloat16) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(1536, 576, bias=True).to(dtype)  # SmolLM2's down_proj shape


def _buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for n, b in module.named_buffers() if n.startswith("weight_"))


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_real_mode_forward_equals_linear_with_dequantized_weight(name):
    # FP4 runs tiled dequant; a weight this small is one tile, so the result is bitwise F.linear.
    # int4 runs torch's int4 kernel: its tolerance is tested in tests/nn/test_kernels.py
    lin = _linear()
    q = quantize_linear(lin, name, mode="real")
    x = torch.randn(3, 1536, dtype=torch.bfloat16)
    w = get_format(name).dequantize(q.qweight, torch.bfloat16)
    assert torch.equal(q(x), F.linear(x, w, lin.bias))


@pytest.mark.parametrize(("name", "limit"), list(LIMITS.items()))
def test_real_mode_weight_memory_vs_bf16(name, limit):
    lin = _linear()
    q = quantize_linear(lin, name, mode="real")
    assert _buffer_bytes(q) / (lin.weight.numel() * 2) <= limit


def test_real_mode_holds_no_dense_weight():
    q = quantize_linear(_linear(), "nvfp4", mode="real")
    assert q._dense is None and q.weight_codes.dtype == torch.uint8


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_fp4_forward_keeps_nothing_but_the_packed_weight(name):
    q = quantize_linear(_linear(), name, mode="real")
    before = _buffer_bytes(q)
    q(torch.randn(2, 1536, dtype=torch.bfloat16))
    assert _buffer_bytes(q) == before and not q._kcache  # the tile lives in shared scratch


@pytest.mark.parametrize("act", ["nvfp4", "mxfp4"])
def test_w4a4_forward_quantizes_the_input(act):
    lin = _linear()
    fmt = get_format(act)
    q = quantize_linear(lin, act, mode="real", act_format=act)
    x = torch.randn(2, 1536, dtype=torch.bfloat16)
    expected = F.linear(fmt.fake_activation(x), fmt.dequantize(q.qweight, torch.bfloat16), lin.bias)
    assert torch.equal(q(x), expected)
