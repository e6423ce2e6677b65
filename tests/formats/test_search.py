"""MSE scale search: never worse than round-to-nearest per block, legal scales, weighting."""

import pytest
import torch

from quantkit.formats import get_format
from quantkit.formats.search import mse_quantize, mse_scales

NAMES = ["nvfp4", "mxfp4", "mxfp4_floor", "int4", "int4_ch"]


def _w() -> torch.Tensor:
    return torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def _block_err(name: str, w: torch.Tensor, qt) -> torch.Tensor:
    fmt = get_format(name)
    g = getattr(fmt, "block", None) or fmt.group or w.shape[1]
    d = (fmt.dequantize(qt) - w.float()).square()
    return d.reshape(w.shape[0], -1, g).sum(-1)


@pytest.mark.parametrize("name", NAMES)
def test_every_block_error_is_at_most_round_to_nearest(name):
    w, fmt = _w(), get_format(name)
    assert (_block_err(name, w, mse_quantize(fmt, w)) <= _block_err(name, w, fmt.quantize(w))).all()


@pytest.mark.parametrize("name", NAMES)
def test_total_error_is_strictly_lower_on_gaussian_weights(name):
    w, fmt = _w(), get_format(name)
    assert _block_err(name, w, mse_quantize(fmt, w)).sum() < _block_err(name, w, fmt.quantize(w)).sum()


@pytest.mark.parametrize("name", NAMES)
def test_result_is_a_qtensor_of_the_same_format_and_layout(name):
    w, fmt = _w(), get_format(name)
    q, ref = mse_quantize(fmt, w), fmt.quantize(w)
    layout = lambda t: (t.format, t.codes.shape, t.scale.shape, t.scale.dtype)  # noqa: E731
    assert layout(q) == layout(ref)


def test_grid_of_one_reproduces_round_to_nearest():
    w, fmt = _w(), get_format("nvfp4")
    q, ref = mse_quantize(fmt, w, grid=[1.0]), fmt.quantize(w)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scale.view(torch.uint8), ref.scale.view(torch.uint8))


def test_nvfp4_keeps_the_given_global_scale():
    w, fmt = _w(), get_format("nvfp4")
    gs = fmt.weight_global_scale(w) / 2
    assert mse_quantize(fmt, w, global_scale=gs).global_scale.item() == gs.item()


def test_column_weight_changes_the_choice_toward_weighted_columns():
    w, fmt = _w(), get_format("int4")
    cw = torch.ones(256)
    cw[::32] = 1e4  # the first column of every group matters most
    s = mse_scales(fmt, w, col_weight=cw)
    q = fmt.encode(w, s)
    err_first = (fmt.dequantize(q) - w.float())[:, ::32].square().sum()
    err_plain = (fmt.dequantize(mse_quantize(fmt, w)) - w.float())[:, ::32].square().sum()
    assert err_first <= err_plain
