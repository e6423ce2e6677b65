"""Kept Hessians (passes/input_stats.py): awq measures X^T X of every linear in its one block forward and keeps
them current through its scales and rotate's transforms, so gptq does not run the block again for them. What gptq
takes equals a new measurement of the transformed block; a pass that does not keep them current drops them."""

from typing import ClassVar

import pytest
import torch

from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.passes import input_stats
from quantkit.passes.awq import Awq
from quantkit.passes.base import Pass
from quantkit.passes.gptq import Gptq
from quantkit.passes.input_stats import KEPT, input_second_moments
from quantkit.passes.rotate import Rotate
from quantkit.stream.loop import run_stage
from tests.passes.test_awq import _with_outlier_channels
from tests.tiny_models import tiny_model

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def _ctx(model) -> Context:
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    return Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"), calib=calib)


class _Probe(Pass):
    """A block pass that reads kept Hessians: it records them and a new measurement of every linear's."""

    name: ClassVar[str] = "probe"
    execution: ClassVar[str] = "block"
    reads_input_hessians: ClassVar[bool] = True

    def needs_inputs(self, ctx) -> bool:
        return True

    def run_block(self, blk, ctx) -> None:
        kept = {n: h.clone() for n, h in blk.extra.get(KEPT, {}).items()}
        names = [f"{blk.prefix}.{n}" for n in LINEARS]
        ctx.scratch.setdefault("probe", []).append((kept, input_second_moments(blk, names, "hessian")))


class _Bystander(Pass):
    """A block pass that changes nothing but does not declare that it keeps the Hessians current."""

    name: ClassVar[str] = "bystander"
    execution: ClassVar[str] = "block"

    def run_block(self, blk, ctx) -> None:
        pass


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_kept_hessians_through_awq_and_an_online_rotation_equal_a_new_measurement(dtype, tol):
    model = _with_outlier_channels(tiny_model("llama", dtype=dtype))
    ctx = _ctx(model)
    run_stage([Awq(format="mxfp4", rotation=16), Rotate(block_size=16, online=True, fuse_vo=False), _Probe()], ctx)
    assert ctx.report["awq"]["groups_scaled"] > 0  # the S^-1 H S^-1 update is exercised
    assert len(ctx.scratch["probe"]) == model.config.num_hidden_layers
    for kept, measured in ctx.scratch["probe"]:
        assert sorted(kept) == sorted(measured)  # every linear of the block, o_proj included
        for n, h in measured.items():
            # an untransformed matrix would be off by O(1): the rotation mixes every 16 channels
            assert _rel(kept[n], h) < tol, (n, _rel(kept[n], h))


def test_without_a_reader_awq_keeps_nothing_and_without_a_keeper_nothing_is_kept():
    model = _with_outlier_channels(tiny_model("llama"))
    ctx = _ctx(model)
    run_stage([Awq(format="nvfp4"), _Bystander(), _Probe()], ctx)  # the bystander's run_block ends them
    assert all(kept == {} for kept, _ in ctx.scratch["probe"])
    ctx = _ctx(_with_outlier_channels(tiny_model("llama")))
    run_stage([Rotate(block_size=16), _Probe()], ctx)  # nothing measured them
    assert all(kept == {} for kept, _ in ctx.scratch["probe"])


def test_a_fused_value_rotation_drops_o_projs_and_gptq_measures_only_that(monkeypatch):
    asked: list[list[str]] = []
    real = input_stats.input_second_moments

    def spy(blk, names, kind):
        asked.append([n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names])
        return real(blk, names, kind)

    monkeypatch.setattr(input_stats, "input_second_moments", spy)
    model = _with_outlier_channels(tiny_model("llama"))
    ctx = _ctx(model)
    run_stage([Awq(format="nvfp4"), Rotate(block_size=16), Gptq(format="nvfp4")], ctx)
    # gptq measures per block o_proj alone (the fused v/o rotation changed its input); awq kept the other six
    assert asked == [["self_attn.o_proj"]] * model.config.num_hidden_layers


@pytest.mark.parametrize("sequential", [False, True])
def test_gptq_on_kept_hessians_gives_the_model_gptq_on_measured_ones_gives(monkeypatch, sequential):
    def quantized(share: bool):
        monkeypatch.setattr(Gptq, "reads_input_hessians", share)
        torch.manual_seed(0)  # the same random model both times
        model = _with_outlier_channels(tiny_model("llama"))
        ctx = _ctx(model)
        run_stage([Awq(format="mxfp4", rotation=16), Rotate(block_size=16, online=True, fuse_vo=False),
                   Gptq(format="mxfp4", observer="mx_exp", weighting="hessian", act_order=True, sequential=sequential,
                        refine_sweeps=2, mode="fake")], ctx)
        with torch.no_grad():
            logits = model(torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))).logits
        return logits, ctx.report["gptq"]["gptq_loss_total"]

    (shared, loss_shared), (measured, loss_measured) = quantized(True), quantized(False)
    assert abs(loss_shared - loss_measured) <= 1e-5 * loss_measured  # fp32: the same codes up to rounding
    assert _rel(shared, measured) < 1e-4
