"""GPTQ's coordinate-descent refinement (solver.refine, the pass's refine_sweeps): it never raises the layer
objective, it ends at a point where no single element can move to a better grid point, with a diagonal H it
is round-to-nearest, and the checkpoint codes hold exactly the refined values."""

import pytest
import torch

from quantkit.formats import get_format
from quantkit.passes.gptq import Gptq, gptq_quantize
from quantkit.passes.gptq.solver import _column_rounder, refine

from tests.passes.test_gptq import _correlated_inputs, _ctx, _tiny_llama

FORMATS = ["nvfp4", "mxfp4", "int4"]


def _problem(seed: int = 0, out: int = 48, d: int = 128):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, d, generator=g) * 0.05).to(torch.bfloat16)
    x = _correlated_inputs(1024, d, seed)
    x[:, :2] *= 8  # a couple of large input channels, as real activations have
    return w, x.T @ x


def _objective(w, deq, h) -> float:
    e = w.double() - deq.double()
    return float((e @ h.double() * e).sum())


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    hd = h.clone()
    hd.diagonal().add_(damp * h.diagonal().mean())
    return hd


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", FORMATS)
def test_refinement_lowers_the_dampened_objective_and_the_codes_hold_it(name, act_order):
    fmt = get_format(name)
    w, h = _problem()
    plain, _ = gptq_quantize(fmt, w, h, dampening=0.1, act_order=act_order)
    refined, info = gptq_quantize(fmt, w, h, dampening=0.1, act_order=act_order, refine_sweeps=4)
    hd = _damped(h, 0.1)
    before, after = _objective(w, fmt.dequantize(plain), hd), _objective(w, fmt.dequantize(refined), hd)
    assert after < before  # strictly: correlated inputs leave GPTQ's greedy pass short of a coordinate optimum
    r = info["refine"]
    assert r["objective_before"] == pytest.approx(before, rel=1e-4)
    assert r["objective_after"] == pytest.approx(after, rel=1e-4)  # the stored codes decode to what was refined
    assert r["moved"] > 0
    assert torch.equal(_bits(refined.scale), _bits(plain.scale))  # the scales stay those chosen before the loop


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.mark.parametrize("name", FORMATS)
def test_each_sweep_is_monotone(name):
    fmt = get_format(name)
    w, h = _problem(1)
    hd = _damped(h, 0.1)
    objs = []
    for sweeps in range(0, 5):
        qt, _ = gptq_quantize(fmt, w, h, dampening=0.1, refine_sweeps=sweeps)
        objs.append(_objective(w, fmt.dequantize(qt), hd))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(objs, objs[1:]))
    assert objs[-1] < objs[0]


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_at_the_fixed_point_no_single_element_has_a_better_grid_point(name):
    fmt = get_format(name)
    w, h = _problem(2, out=16, d=64)
    qt, info = gptq_quantize(fmt, w, h, dampening=0.1, refine_sweeps=100)
    assert info["refine"]["sweeps"] < 100  # it stopped because nothing moved
    hd = _damped(h, 0.1).double()
    deq = fmt.dequantize(qt).double()
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    grid = torch.cat([-grid.flip(0), grid])
    divisor = fmt.divisor(qt.scale, None if qt.global_scale is None else qt.global_scale.float()).double()
    divisor = divisor.repeat_interleave(fmt.block, dim=1)  # [out, in]
    base = _objective(w, deq, hd)
    for r, j in [(0, 0), (3, 5), (7, 17), (15, 63), (9, 40)]:
        for v in grid * divisor[r, j]:  # every other value element (r, j) could take on its block's grid
            trial = deq.clone()
            trial[r, j] = v
            assert _objective(w, trial, hd) >= base * (1 - 1e-9)


@pytest.mark.parametrize("name", FORMATS)
def test_a_diagonal_hessian_refines_to_round_to_nearest_from_any_grid_start(name):
    fmt = get_format(name)
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(3))
    rtn = fmt.quantize(w)
    g = fmt.block if hasattr(fmt, "block") else (fmt.group or 128)
    scales = rtn.scale.repeat_interleave(g, dim=1) if rtn.scale.shape[1] != 1 else rtn.scale.expand(-1, 128)
    gs = None if getattr(rtn, "global_scale", None) is None else rtn.global_scale.float().reshape(1)
    rounder = _column_rounder(fmt, scales, gs)
    start = torch.stack([rounder(torch.zeros(24), j) for j in range(128)], dim=1)  # all zeros: on every grid
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(4)) + 0.5)
    what, info = refine(w.float(), start, h, rounder, sweeps=5)
    ref = fmt.dequantize(rtn).float()
    differ = what != ref
    assert differ.float().mean() < 0.01  # round-to-nearest everywhere but at ties: the 1-D optimum w + G/H is
    # computed in fp32, so an element exactly between two grid points (int4's amax maps to 7.5) may go either way
    assert torch.allclose((w - what).abs()[differ], (w - ref).abs()[differ], rtol=1e-5, atol=1e-6)
    assert info["sweeps"] < 5  # it reached a fixed point


def test_refinement_needs_static_scales():
    fmt = get_format("nvfp4")
    w, h = _problem()
    with pytest.raises(ValueError, match="static scales"):
        gptq_quantize(fmt, w, h, static_scales=False, refine_sweeps=1)


def test_pass_reports_the_refined_objective_and_changes_the_weights():
    plain, refined = _tiny_llama(), _tiny_llama()
    plain_ctx = _ctx(plain)
    Gptq(format="nvfp4", mode="fake").run(plain, plain_ctx)
    ctx = _ctx(refined)
    Gptq(format="nvfp4", mode="fake", refine_sweeps=3, refine_dampening=0.3).run(refined, ctx)
    row = ctx.report["gptq"]
    assert row["refine_sweeps"] == 3 and row["refine_dampening"] == 0.3
    assert 0 < row["refine_objective_ratio"] < 1
    a = plain.model.layers[1].mlp.down_proj.dequantized_weight()
    b = refined.model.layers[1].mlp.down_proj.dequantized_weight()
    assert a.shape == b.shape and not torch.equal(a, b)
    assert "refine_sweeps" not in plain_ctx.report["gptq"]


# -- NVFP4 block-scale refinement (refine_scale_rounds, solver.refine_block_scales) --------------------------
def _e4m3_values() -> torch.Tensor:
    return torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # the 126 finite positives


def test_scale_rounds_lower_the_objective_and_the_checkpoint_holds_the_new_scales():
    fmt = get_format("nvfp4")
    w, h = _problem(5)
    codes_only, a = gptq_quantize(fmt, w, h, dampening=0.1, act_order=True, refine_sweeps=10, refine_dampening=0.3)
    both, b = gptq_quantize(fmt, w, h, dampening=0.1, act_order=True, refine_sweeps=10, refine_dampening=0.3,
                            refine_scale_rounds=3)
    hd = _damped(h, 0.3)
    obj_a, obj_b = _objective(w, fmt.dequantize(codes_only), hd), _objective(w, fmt.dequantize(both), hd)
    assert b["refine"]["scales_changed"] > 0
    assert obj_b < obj_a  # a changed scale is only taken when strictly better, and the sweeps after never raise it
    assert b["refine"]["objective_after"] == pytest.approx(obj_b, rel=1e-4)  # codes + new scales decode to it
    assert not torch.equal(_bits(both.scale), _bits(codes_only.scale))
    assert both.global_scale == codes_only.global_scale  # fused groups keep their shared global scale


def test_one_block_per_row_gets_the_best_e4m3_scale_of_all_126_for_its_codes():
    """With one 16-element block per row the rows are independent parabolas in the scale: the pass must pick,
    for the codes it holds, the best of every finite E4M3 value (checked exhaustively)."""
    from quantkit.passes.gptq.solver import refine_block_scales

    fmt = get_format("nvfp4")
    w, h = _problem(6, out=32, d=16)
    w = w.float()
    gs = fmt.weight_global_scale(w).float().reshape(1)
    start = fmt.quantize(w, gs)
    what = fmt.dequantize(start)
    codes = what / fmt.divisor(start.scale, gs)  # [32, 1] scales: one block per row
    new_what, new_scales, changed = refine_block_scales(w, what, h, start.scale, gs, 16)
    assert changed > 0
    cands = _e4m3_values()
    for r in range(32):
        e = w[r].double() - (codes[r].double()[None, :] * (cands.double() / gs.double())[:, None])  # [126, 16]
        objs = ((e @ h.double()) * e).sum(1)
        chosen = _objective(w[r:r + 1], new_what[r:r + 1], h)
        assert chosen <= float(objs.min()) * (1 + 1e-6)
        assert torch.allclose(new_what[r], codes[r] * new_scales[r].float() / gs, rtol=1e-6)


def test_scale_rounds_are_nvfp4_only_and_need_sweeps():
    w, h = _problem()
    with pytest.raises(ValueError, match="nvfp4 only"):
        gptq_quantize(get_format("mxfp4"), w, h, refine_sweeps=2, refine_scale_rounds=1)
    with pytest.raises(ValueError, match="needs refine_sweeps"):
        gptq_quantize(get_format("nvfp4"), w, h, refine_scale_rounds=1)


def test_pass_refuses_scale_rounds_outside_nvfp4_or_without_sweeps_and_reports_them():
    with pytest.raises(ValueError, match="for nvfp4"):
        Gptq(format="mxfp4", refine_sweeps=2, refine_scale_rounds=1)
    with pytest.raises(ValueError, match="needs refine_sweeps"):
        Gptq(format="nvfp4", refine_scale_rounds=1)
    model = _tiny_llama()
    ctx = _ctx(model)
    Gptq(format="nvfp4", mode="fake", refine_sweeps=3, refine_scale_rounds=2).run(model, ctx)
    row = ctx.report["gptq"]
    assert row["refine_scale_rounds"] == 2 and row["refine_scales_changed"] > 0
    assert 0 < row["refine_objective_ratio"] < 1
