"""Observers: exact E4M3 candidate grid, never worse than minmax on their own objective, layout."""

import pytest
import torch

from quantkit.errors import FormatError
from quantkit.formats import get_format
from quantkit.formats.e2m1 import round_e2m1
from quantkit.formats.fp4 import blocks
from quantkit.formats.observers import (
    E4M3_FIRST_CODE,
    E4M3_LAST_CODE,
    OBSERVERS,
    fast_round_e2m1,
    four_over_six_global_scale,
    make_objective,
    range_multipliers,
    range_mse_objective,
)

IN = 128


def _weights(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        w = torch.randn(48, IN, generator=g)
    else:  # heavy tails: Student-t with 2 degrees of freedom, a few huge outliers
        z = torch.randn(48, IN, generator=g)
        chi = torch.randn(48, IN, 2, generator=g).square().sum(-1)
        w = z / (chi / 2).sqrt()
    return (w * 0.02).to(torch.bfloat16)


def _importance(kind: str, seed: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed + 100)
    if kind == "none":
        return None
    x = torch.randn(512, IN, generator=g) * torch.linspace(0.1, 4.0, IN)  # uneven channels
    return x.square().mean(0) if kind == "channel" else x.T @ x


def _objective_error(fmt, w, scale, gs, importance, power=2.0) -> torch.Tensor:
    """Per-block objective [out, nb] of quantizing w with these stored scales (true dequantization)."""
    obj = make_objective(importance, w.shape[1], fmt.block, power)
    xb = blocks(w, fmt.block, fmt.name).float()
    return obj(fmt.qdq_blocks(xb, scale, gs) - xb)


def test_e4m3_candidate_grid_is_exact_and_complete():
    codes = torch.arange(E4M3_FIRST_CODE, E4M3_LAST_CODE + 1, dtype=torch.uint8)
    vals = codes.view(torch.float8_e4m3fn).float()
    back = vals.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(back, codes)  # every candidate round-trips through FP8
    assert len(codes) == 126 and bool(torch.isfinite(vals).all()) and bool((vals > 0).all())
    assert bool((vals[1:] > vals[:-1]).all())  # codes are monotone in value: code +- 1 is a neighbour
    assert vals[-1].item() == 448.0 and vals[0].item() == 2.0**-9


def test_fast_round_matches_the_format_rounding_including_ties():
    x = torch.linspace(-8, 8, 400_001)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1e30])
    x = torch.cat([x, ties, -ties])
    x = torch.cat([x, torch.nextafter(x, torch.tensor(9.0)), torch.nextafter(x, torch.tensor(-9.0))])
    tiny = torch.tensor([0.0, 2.0**-149, 2.0**-126, 1e-30, float("inf")])  # zero, subnormals, the exponent-bit edge
    x = torch.cat([x, tiny, -tiny])
    fast = fast_round_e2m1(x)
    assert torch.equal(fast, round_e2m1(x))
    # tiny negatives keep the sign bit as round_e2m1 does (compressed-tensors' codes); only -0.0 itself differs
    assert torch.equal(fast.signbit(), round_e2m1(x).signbit() | ((x == 0) & x.signbit()))
    assert bool(fast_round_e2m1(torch.tensor([float("nan")])).isnan().all())
    for dtype in (torch.float64, torch.bfloat16, torch.float16):  # each width's own exponent field
        y = x.to(dtype)
        assert fast_round_e2m1(y).dtype == dtype
        assert torch.equal(fast_round_e2m1(y).float(), round_e2m1(y.float()))


NVFP4_SEARCHES = ["e4m3_grid", "e4m3_local", "four_over_six", "mse"]


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("weighting", ["none", "channel", "hessian"])
@pytest.mark.parametrize("name", NVFP4_SEARCHES)
def test_nvfp4_search_is_never_worse_than_minmax_on_its_objective(name, weighting, kind):
    if name == "mse" and weighting == "hessian":
        pytest.skip("the earlier mse grid takes per-channel weights only")
    fmt = get_format("nvfp4")
    for seed in range(2):
        w, imp = _weights(kind, seed), _importance(weighting, seed)
        gs = fmt.weight_global_scale(w)
        scale, gs_out = OBSERVERS.get(name).scales(fmt, w, gs, imp)
        # four-over-six's own reference is map-to-6 under its own (256) global scale
        ref_gs = gs_out if name == "four_over_six" else gs
        ref = fmt.block_scales(blocks(w, 16, "nvfp4"), ref_gs)
        err = _objective_error(fmt, w, scale, gs_out, imp)
        err_ref = _objective_error(fmt, w, ref, ref_gs, imp)
        assert bool((err <= err_ref).all()) and err.sum() < err_ref.sum()


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("weighting", ["none", "channel"])
def test_range_mse_is_never_worse_than_minmax_on_its_unrounded_objective(weighting, kind):
    w, imp = _weights(kind, 0), _importance(weighting, 0)
    obj = make_objective(imp, IN, 16, 2.4)
    xb = blocks(w, 16, "nvfp4").float()
    m = range_multipliers(xb, obj)
    err, err_ref = range_mse_objective(xb, m, obj), range_mse_objective(xb, torch.ones_like(m), obj)
    assert bool((err <= err_ref).all()) and err.sum() < err_ref.sum()
    assert bool(((m >= 0.8 - 1e-6) & (m <= 1.8 + 1e-6)).all())


@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("weighting", ["none", "channel", "hessian"])
def test_mx_exponent_search_is_never_worse_than_the_rule(weighting, kind):
    fmt = get_format("mxfp4")
    w, imp = _weights(kind, 1), _importance(weighting, 1)
    scale, _ = OBSERVERS.get("mx_exp").scales(fmt, w, None, imp)
    ref = fmt.block_scales(blocks(w, 32, "mxfp4"), None)
    err, err_ref = _objective_error(fmt, w, scale, None, imp), _objective_error(fmt, w, ref, None, imp)
    assert bool((err <= err_ref).all()) and err.sum() < err_ref.sum()
    assert bool(((scale.int() - ref.int()).abs() <= 1).all())


def test_hessian_objective_is_the_block_quadratic_form():
    w, h = _weights("gauss", 0).float(), _importance("hessian", 0)
    e = torch.randn(w.shape)
    got = make_objective(h, IN, 16, 2.0)(e.reshape(48, IN // 16, 16))
    r, b = 5, 3
    eb = e[r, 16 * b : 16 * b + 16]
    want = eb @ h[16 * b : 16 * b + 16, 16 * b : 16 * b + 16] @ eb
    assert torch.allclose(got[r, b], want, rtol=1e-4)


@pytest.mark.parametrize("name", ["minmax", "e4m3_grid", "e4m3_local", "range_mse", "four_over_six", "mse"])
def test_nvfp4_output_is_a_plain_qtensor_with_the_callers_global_scale(name):
    fmt, w = get_format("nvfp4"), _weights("gauss", 0)
    gs = fmt.weight_global_scale(w) * 0.5  # a fused group's shared (smaller) scale
    q, ref = OBSERVERS.get(name)(fmt, w, gs), fmt.quantize(w, gs)
    layout = lambda t: (t.format, t.codes.shape, t.codes.dtype, t.scale.shape, t.scale.dtype)  # noqa: E731
    assert layout(q) == layout(ref)
    want = four_over_six_global_scale(gs) if name == "four_over_six" else gs
    assert q.global_scale.item() == want.item()
    # the codes are what round-to-nearest gives for the chosen scales: export is unchanged
    assert torch.equal(fmt.encode(w, q.scale, q.global_scale).codes, q.codes)


def test_four_over_six_global_scale_uses_256():
    fmt, w = get_format("nvfp4"), _weights("gauss", 0)
    gs = fmt.weight_global_scale(w)
    assert four_over_six_global_scale(gs).item() == pytest.approx(256 * 6 / w.float().abs().max().item(), rel=1e-2)


def test_zero_blocks_stay_zero():
    fmt = get_format("nvfp4")
    w = _weights("gauss", 0)
    w[:, :16] = 0
    for name in ("e4m3_local", "range_mse", "four_over_six"):
        assert (fmt.dequantize(OBSERVERS.get(name)(fmt, w))[:, :16] == 0).all()


def test_wrong_format_or_importance_is_a_clear_error():
    with pytest.raises(FormatError, match="needs nvfp4"):
        OBSERVERS.get("e4m3_grid")(get_format("mxfp4"), _weights("gauss", 0))
    with pytest.raises(FormatError, match="importance must be"):
        OBSERVERS.get("e4m3_local")(get_format("nvfp4"), _weights("gauss", 0), None, torch.ones(7))
    with pytest.raises(FormatError, match="unknown observer"):
        OBSERVERS.get("nope")
