"""Rotated checkpoints: fused rotations reload in plain transformers; online rotations are written as
compressed-tensors writes them and applied by quantkit's runtime (transformers 5 ignores them)."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quantkit.api import save_output
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.export.ct_reader import load_ct_checkpoint
from quantkit.export.ct_transform import attach_online_transforms
from quantkit.nn.qlinear import QLinear
from quantkit.passes.quantize import Quantize
from quantkit.passes.rotate import Rotate
from quantkit.verify import verify_checkpoint
from tests.tiny_models import tiny_model

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


def _quantized(tmp_path, *, online: bool, fmt: str = "nvfp4", fuse_vo: bool = True):
    # compressed-tensors decompresses FP4 to bf16, so the model is bf16 as in test_ct_roundtrip
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Rotate(block_size=16, fuse_vo=fuse_vo, online=online).run(model, ctx)
    Quantize(format=fmt, mode="fake").run(model, ctx)
    save_output(model, _NoTokenizer(), tmp_path)
    return model


def _logprobs(model) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(IDS).logits.float(), -1)


def test_fused_rotation_checkpoint_has_no_transform_and_reloads_in_transformers_bitwise(tmp_path):
    model = _quantized(tmp_path, online=False)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["transform_config"] == {}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logprobs(loaded), _logprobs(model))
    assert verify_checkpoint(tmp_path).ok


def test_online_rotation_is_written_as_llm_compressor_quip_writes_it(tmp_path):
    from compressed_tensors.transform import TransformConfig

    _quantized(tmp_path, online=True, fuse_vo=False)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    scheme = TransformConfig.model_validate(qc["transform_config"]).config_groups["v"]
    assert scheme.type == "hadamard" and scheme.head_dim == 16 and not scheme.randomize
    assert [(a.location, a.inverse, a.targets, a.ignore) for a in scheme.apply] == [
        ("input", False, ["Linear"], ["lm_head"]), ("weight_input", True, ["Linear"], ["lm_head"])]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = [k for k in f.keys() if k.endswith(".v_input.weight")]
        h = f.get_tensor("model.layers.0.mlp.down_proj.v_input.weight")
    assert len(names) == 2 * 7  # one matrix per rotated linear, as compressed-tensors registers them
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    assert torch.equal(h, deterministic_hadamard_matrix(16, torch.float32))


def test_with_fuse_vo_o_proj_is_written_without_an_online_transform(tmp_path):
    _quantized(tmp_path, online=True, fuse_vo=True)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    args = qc["transform_config"]["config_groups"]["v"]["apply"][0]
    assert "model.layers.0.self_attn.o_proj" not in args["targets"] and "model.layers.0.mlp.down_proj" in args["targets"]


def test_quantkit_runtime_reads_online_rotations_and_matches_the_in_memory_model(tmp_path):
    model = _quantized(tmp_path, online=True, fuse_vo=False)
    back = load_ct_checkpoint(tmp_path, torch.bfloat16)
    assert all(m.input_rotation == 16 for m in back.modules() if isinstance(m, QLinear))
    assert torch.equal(_logprobs(back), _logprobs(model))


def test_transformers_ignores_the_transform_and_attach_fixes_it(tmp_path):
    model = _quantized(tmp_path, online=True, fuse_vo=False)
    ours = _logprobs(model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    plain = _logprobs(loaded)
    # the documented gap: without the online rotation the outputs are far off
    assert (plain - ours).abs().max() > 0.5
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert attach_online_transforms(loaded, qc) == 2 * 7
    assert torch.equal(_logprobs(loaded), ours)


def test_verify_applies_compressed_tensors_transforms_and_flags_plain_transformers(tmp_path):
    _quantized(tmp_path, online=True, fuse_vo=False)
    assert verify_checkpoint(tmp_path, cheap=True).ok
    full = verify_checkpoint(tmp_path)
    assert full.ok, [f.message for f in full.errors]
    assert any(f.check == "run.transform" and "ignores transform_config" in f.message for f in full.warnings)


def test_compressed_tensors_transforms_on_transformers_equal_quantkit_runtime(tmp_path):
    from quantkit.verify.checkpoint import Checkpoint
    from quantkit.verify.run_checks import apply_online_transforms

    model = _quantized(tmp_path, online=True, fuse_vo=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert apply_online_transforms(Checkpoint(tmp_path), loaded) == 1
    assert torch.equal(_logprobs(loaded), _logprobs(model))


def test_verify_fails_when_a_stored_transform_matrix_is_wrong(tmp_path):
    from safetensors.torch import load_file, save_file

    _quantized(tmp_path, online=True, fuse_vo=False)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    key = "model.layers.0.mlp.down_proj.v_input.weight"
    tensors[key] = tensors[key].flip(0).contiguous()  # still +-1 and the right size: only the run can tell
    save_file(tensors, f, metadata={"format": "pt"})
    assert verify_checkpoint(tmp_path, cheap=True).ok
    full = verify_checkpoint(tmp_path)
    assert not full.ok and any(f.check == "run.runtime" for f in full.errors)


def test_a_rotated_linear_left_unquantized_is_refused_by_the_writer(tmp_path):
    from quantkit.errors import QuantkitError
    from quantkit.targets import Targets

    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Rotate(block_size=16, fuse_vo=False, online=True).run(model, ctx)
    Quantize(format="nvfp4", targets=Targets(roles=["q", "k", "v", "o"])).run(model, ctx)
    with pytest.raises(QuantkitError, match="not quantized"):
        save_output(model, _NoTokenizer(), tmp_path)


def test_rotate_streams_with_the_same_bytes_as_whole_model_execution(tiny_llama_dir, tmp_path):
    from quantkit.api import apply
    from quantkit.recipe import parse_recipe

    recipe = parse_recipe({
        "name": "rotate-nvfp4", "calib": {"n_samples": 2, "seq_len": 32, "batch_size": 2}, "eval": {"enabled": False},
        "passes": [{"pass": "rotate", "block_size": 16, "fuse_vo": True, "online": True},
                   {"pass": "quantize", "format": "nvfp4", "mode": "real"}]})
    files = {}
    for mode in ("whole", "streaming"):
        apply(recipe, str(tiny_llama_dir), output=tmp_path / mode, execution=mode)
        files[mode] = {p.name: p.read_bytes() for p in sorted((tmp_path / mode).iterdir())
                       if p.suffix == ".safetensors" or p.name == "config.json"}
    assert files["whole"] == files["streaming"]
    qc = json.loads(files["streaming"]["config.json"])["quantization_config"]
    assert qc["transform_config"]["config_groups"]["v"]["head_dim"] == 16


def test_a_transform_quantkit_cannot_apply_is_refused_on_load(tmp_path):
    from quantkit.errors import ModelLoadError

    _quantized(tmp_path, online=True, fuse_vo=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["transform_config"]["config_groups"]["v"]["type"] = "random-hadamard"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not applied by quantkit's runtime"):
        load_ct_checkpoint(tmp_path, torch.bfloat16)


# -- per-role blocks (rotate's block_sizes): one transform scheme per block size -----------------------------
def _per_role(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Rotate(block_size=16, fuse_vo=False, online=True, block_sizes={"down": 64}).run(model, ctx)
    Quantize(format="nvfp4", mode="fake").run(model, ctx)
    save_output(model, _NoTokenizer(), tmp_path)
    return model


def test_per_role_blocks_are_written_as_one_transform_scheme_per_block(tmp_path):
    from compressed_tensors.transform import TransformConfig

    model = _per_role(tmp_path)
    assert model.model.layers[1].mlp.down_proj.input_rotation == 64
    assert model.model.layers[1].mlp.up_proj.input_rotation == 16
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    groups = TransformConfig.model_validate(qc["transform_config"]).config_groups
    assert sorted(groups) == ["v", "v64"]
    assert groups["v"].head_dim == 16 and groups["v64"].head_dim == 64
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert groups["v64"].apply[0].targets == downs
    assert not set(downs) & set(groups["v"].apply[0].targets) and len(groups["v"].apply[0].targets) == 2 * 6
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.v64_input.weight").shape == (64, 64)
        assert f.get_tensor("model.layers.0.mlp.up_proj.v_input.weight").shape == (16, 16)
        assert not [k for k in f.keys() if k.endswith("down_proj.v_input.weight")]


def test_per_role_blocks_round_trip_through_quantkit_and_compressed_tensors_runtimes(tmp_path):
    from quantkit.verify.checkpoint import Checkpoint
    from quantkit.verify.run_checks import apply_online_transforms

    model = _per_role(tmp_path)
    ours = _logprobs(model)
    back = load_ct_checkpoint(tmp_path, torch.bfloat16)
    assert back.model.layers[0].mlp.down_proj.input_rotation == 64
    assert back.model.layers[0].mlp.down_proj.input_rotation_group == "v64"
    assert torch.equal(_logprobs(back), ours)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert apply_online_transforms(Checkpoint(tmp_path), loaded) == 2  # compressed-tensors' own code, both schemes
    assert torch.equal(_logprobs(loaded), ours)
    full = verify_checkpoint(tmp_path)
    assert full.ok, [f.message for f in full.errors]
