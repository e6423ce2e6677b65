"""The `rotate` pass: rotations leave the unquantized model's outputs unchanged, and the online op is
compressed-tensors' own hadamard input transform."""

import copy

import pytest
import torch

from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.errors import QuantkitError, RecipeError
from quantkit.nn.qlinear import QLinear, rotate_input
from quantkit.passes.quantize import Quantize
from quantkit.passes.rotate import Rotate
from quantkit.passes.rotate.hadamard import RotationError
from quantkit.recipe import parse_recipe
from tests.tiny_models import tiny_model

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def _ctx(model) -> Context:
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"), calib=calib)


def _model(arch: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_model(arch, dtype=torch.float32)


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


# llama: GQA (4 query heads share 2 kv heads); qwen2: v_proj has a bias; mistral: GQA too
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("block", [4, 16])
def test_fused_value_output_rotation_leaves_logits_unchanged(arch, block):
    model = _model(arch)
    ref = _logits(model)
    before = model.model.layers[0].self_attn.o_proj.weight.clone()
    Rotate(block_size=block, fuse_vo=True).run(model, _ctx(model))
    assert not torch.allclose(model.model.layers[0].self_attn.o_proj.weight, before)  # it did rotate
    assert _rel(_logits(model), ref) < 1e-5


@pytest.mark.parametrize("block", [8, 16])  # at most head_dim (16) for the fused v/o rotation
def test_online_rotation_of_every_linear_leaves_logits_unchanged(block):
    model = _model()
    ref = _logits(model)
    ctx = _ctx(model)
    Rotate(block_size=block, fuse_vo=True, online=True).run(model, ctx)
    assert ctx.report["rotate"]["online_linears"] == 2 * 6  # o_proj is rotated by the fused R only
    assert _rel(_logits(model), ref) < 1e-5


def test_fused_and_online_do_not_double_rotate_o_proj():
    model = _model()
    Rotate(block_size=16, fuse_vo=True, online=True).run(model, _ctx(model))
    assert getattr(model.model.layers[0].self_attn.o_proj, "input_rotation", None) is None
    assert model.model.layers[0].mlp.down_proj.input_rotation == 16


def test_quantized_linears_inherit_the_online_rotation_and_stay_close_to_the_original():
    model = _model()
    ref = _logits(model)
    ctx = _ctx(model)
    Rotate(block_size=16, fuse_vo=False, online=True).run(model, ctx)
    Quantize(format="int8", mode="fake").run(model, ctx)
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, QLinear) and q.input_rotation == 16
    assert _rel(_logits(model), ref) < 0.05  # int8 noise only; a lost rotation gives O(1) errors


def test_gptq_builds_rotated_qlinears_from_rotated_hessians():
    from quantkit.passes.gptq import Gptq

    model = _model()
    ctx = _ctx(model)
    Rotate(block_size=16, fuse_vo=False, online=True).run(model, ctx)
    Gptq(format="nvfp4", mode="fake").run(model, ctx)
    assert all(m.input_rotation == 16 for m in model.modules() if isinstance(m, QLinear))


def test_online_op_equals_compressed_tensors_hadamard_transform_bitwise():
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme, apply_transform_config

    lin = torch.nn.Sequential(torch.nn.Linear(96, 8, dtype=torch.bfloat16))  # the transform stays float32
    scheme = TransformScheme(type="hadamard", head_dim=32, precision=torch.float32,
                             apply=[TransformArgs(targets=["Linear"], location="input")])
    apply_transform_config(lin, TransformConfig(config_groups={"v": scheme}))
    seen = {}
    lin[0].register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    lin(x)
    assert torch.equal(seen["x"], rotate_input(x, 32))


def test_rotated_weights_equal_compressed_tensors_fused_weight_input():
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme, apply_transform_config

    model = _model()
    ct = copy.deepcopy(model)
    Rotate(block_size=16, fuse_vo=False, online=True).run(model, _ctx(model))
    scheme = TransformScheme(type="hadamard", head_dim=16, precision=torch.float32, apply=[
        TransformArgs(targets=["Linear"], location="input", ignore=["lm_head"]),
        TransformArgs(targets=["Linear"], location="weight_input", inverse=True, ignore=["lm_head"])])
    apply_transform_config(ct, TransformConfig(config_groups={"v": scheme}))
    w_ours = model.model.layers[0].mlp.down_proj.weight
    w_ct = ct.model.layers[0].mlp.down_proj.weight
    assert _rel(w_ours.double(), w_ct.double()) < 1e-6
    assert _rel(_logits(model), _logits(ct)) < 1e-5


def test_block_size_that_does_not_divide_head_dim_is_refused():
    model = _model()  # head_dim 16
    with pytest.raises(RotationError, match="does not divide head_dim 16"):
        Rotate(block_size=32, fuse_vo=True).run(model, _ctx(model))


def test_non_power_of_two_block_is_refused_when_parsing():
    with pytest.raises(RecipeError, match="power of two"):
        parse_recipe({"name": "r", "passes": [{"pass": "rotate", "block_size": 24}, {"pass": "quantize", "format": "nvfp4"}]})


def test_rotate_on_an_already_quantized_linear_is_refused():
    model = _model()
    ctx = _ctx(model)
    Quantize(format="int8").run(model, ctx)
    with pytest.raises(QuantkitError, match="before quantize"):
        Rotate(block_size=16, fuse_vo=False, online=True).run(model, ctx)


@pytest.mark.parametrize("passes,message", [
    ([{"pass": "rotate", "online": True}], "writes a dense checkpoint"),
    ([{"pass": "quantize", "format": "nvfp4"}, {"pass": "rotate"}], "rotate must come before"),
    ([{"pass": "rotate"}, {"pass": "rotate"}, {"pass": "quantize", "format": "nvfp4"}], "one rotate pass"),
    ([{"pass": "rotate", "online": True}, {"pass": "llm_int8"}], "quantkit checkpoint"),
    ([{"pass": "calibrate"}, {"pass": "rotate", "online": True}, {"pass": "quantize", "format": "nvfp4",
                                                                 "act_format": "nvfp4"}], "before calibrate"),
])
def test_validate_refuses_rotations_that_cannot_be_stored(passes, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"name": "r", "passes": passes})


def test_online_rotation_without_saving_is_accepted():
    r = parse_recipe({"name": "r", "output": {"save": False}, "passes": [{"pass": "rotate", "online": True}]})
    assert r.passes[0].online


def test_fused_only_rotation_can_be_saved_dense():
    assert parse_recipe({"name": "r", "passes": [{"pass": "rotate", "fuse_vo": True}]}).passes[0].fuse_vo


def test_w4a4_activation_scales_come_from_rotated_inputs():
    from quantkit.passes.calibrate import Calibrate
    from quantkit.recipe import CalibConfig
    from quantkit.stream.loop import run_stage

    model = _model()
    ctx = _ctx(model)
    ctx.given_calib, ctx.calib_config = ctx.calib, CalibConfig(batch_size=4)
    run_stage([Rotate(block_size=16, fuse_vo=False, online=True), Calibrate(),
               Quantize(format="nvfp4", act_format="nvfp4", mode="fake")], ctx)
    # q_proj of block 0 reads the normed embeddings, which no quantized layer touches before it
    seen = {}
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    with torch.inference_mode():
        model(ctx.calib)
    rotated_amax = rotate_input(seen["x"], 16).abs().amax()
    assert torch.allclose(ctx.stats["act_amax"]["model.layers.0.self_attn.q_proj"].squeeze(), rotated_amax, rtol=1e-6)
    assert not torch.allclose(seen["x"].abs().amax(), rotated_amax, rtol=1e-2)  # rotation changed the amax


def test_per_role_blocks_leave_logits_unchanged_and_reach_only_their_role():
    model = _model()
    ref = _logits(model)
    ctx = _ctx(model)
    Rotate(block_size=16, fuse_vo=False, online=True, block_sizes={"down": 128}).run(model, ctx)
    mlp = model.model.layers[0].mlp
    assert (mlp.down_proj.input_rotation, mlp.down_proj.input_rotation_group) == (128, "v128")
    assert (mlp.gate_proj.input_rotation, mlp.gate_proj.input_rotation_group) == (16, "v")
    assert ctx.report["rotate"]["block_sizes"] == {"down": 128}
    assert _rel(_logits(model), ref) < 1e-5


@pytest.mark.parametrize("kw, message", [
    ({"online": True, "block_sizes": {"dwon": 64}}, "match no rotated linear"),
    ({"online": False, "block_sizes": {"down": 64}}, "set online: true"),
    ({"online": True, "block_sizes": {"down": 96}}, "power of two"),
    ({"online": True, "block_sizes": {"down": 256}}, r"256 does not divide model\.layers\.0\.mlp\.down_proj's input dim 128"),
])
def test_bad_per_role_blocks_are_refused(kw, message):
    model = _model()
    with pytest.raises((RotationError, ValueError), match=message):
        Rotate(block_size=16, fuse_vo=False, **kw).run(model, _ctx(model))


def test_awq_must_search_under_the_same_per_role_blocks():
    base = {"name": "r", "passes": [
        {"pass": "calibrate", "collect_stats": False},
        {"pass": "awq", "format": "nvfp4", "rotation": 16},
        {"pass": "rotate", "block_size": 16, "fuse_vo": False, "online": True, "block_sizes": {"down": 64}},
        {"pass": "quantize", "format": "nvfp4"}]}
    with pytest.raises(RecipeError, match="rotation_sizes"):
        parse_recipe(base)
    base["passes"][1]["rotation_sizes"] = {"down": 64}
    assert parse_recipe(base).passes[1].rotation_sizes == {"down": 64}
