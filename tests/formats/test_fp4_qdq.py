"""FP4Format.qdq (the scale searches' fast round-to-nearest) equals dequantize(quantize(w)) bit for bit."""

import pytest
import torch

from quantkit.formats import get_format


def _edge_weights(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g) * torch.logspace(-6, 3, 8)[:, None]  # rows from tiny to large
    w[1] = 0.0  # an all-zero row
    w[2, :16] = 0.0  # an all-zero NVFP4 block
    w[2, 32:64] = 0.0  # an all-zero MXFP4 block
    w[3, 5] = 1e4  # one outlier in a block of small values
    w[4] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 8)  # E2M1 ties at scale 1
    w[5, ::2] = -w[5, ::2].abs()
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_qdq_equals_dequantize_of_quantize(name, dtype):
    fmt = get_format(name)
    w = _edge_weights(dtype)
    for out in (torch.float32, torch.float64, torch.bfloat16):
        ref = fmt.dequantize(fmt.quantize(w), out)
        got = fmt.qdq(w, out)
        assert got.dtype == out
        assert torch.equal(got, ref), (name, dtype, out, (got - ref).abs().max())


def test_qdq_of_random_weights_equals_the_packed_path():
    g = torch.Generator().manual_seed(1)
    for name in ("nvfp4", "mxfp4"):
        fmt = get_format(name)
        w = (torch.randn(96, 256, generator=g) * 0.02).to(torch.bfloat16)
        assert torch.equal(fmt.qdq(w), fmt.dequantize(fmt.quantize(w)))
