"""The "it runs" checks and the --source comparison, on good and deliberately broken checkpoints."""

import pytest
import torch

from quantkit.verify import verify_checkpoint
from tests.verify.factory import edit_config, edit_tensors, write_ct

Q = "model.layers.0.self_attn.q_proj"
ATTN = ("q_proj", "k_proj", "v_proj")


@pytest.fixture(scope="module")
def nvfp4_with_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return write_ct(root / "q", "nvfp4", source=root / "src"), root / "src"


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_clean_checkpoint_runs_and_matches_its_source(nvfp4_with_source):
    ckpt, src = nvfp4_with_source
    r = verify_checkpoint(ckpt, source=str(src))
    assert r.errors == [] and r.warnings == []
    run = r.info["run"]
    assert run["logits_dtype"] == "bfloat16" and run["tokens"] == 16  # no tokenizer saved: 16 random ids
    assert run["runtime_rel_max_diff"] == 0.0 and run["runtime_kl"] == 0.0 and run["runtime_top1_agreement"] == 1.0
    assert run["runtime_tolerance"]["rel_max_diff"] == 0.02  # the floor: 3x the bf16 noise is below it here
    layers = r.info["source"]["layers"]
    assert len(layers) == 14 and all(v["nonfinite"] == 0 and v["zeroed_blocks"] == 0 for v in layers.values())
    assert 0.05 < r.info["source"]["max_rel_err"] < 0.2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp4_checkpoint_declaring_a_dtype_other_than_bf16_fails_to_run(tmp_path, dtype):
    # quantkit's writer always declares bfloat16 for FP4 (see test_writer); a checkpoint from
    # elsewhere may not, so the broken one is made by editing the config quantkit wrote
    p = write_ct(tmp_path / "q", "nvfp4", dtype=dtype)
    assert verify_checkpoint(p, cheap=True).errors == []
    edit_config(p, lambda c: c.update(dtype=str(dtype).removeprefix("torch.")))
    r = verify_checkpoint(p)
    checks = [f.check for f in r.errors]
    assert checks == ["config.dtype", "run.forward"]
    assert "expected m1 and m2 to have the same dtype" in r.errors[1].message
    assert verify_checkpoint(p, cheap=True).errors[0].check == "config.dtype"  # the cheap mode catches it too


def test_int_checkpoint_in_fp32_runs(tmp_path):
    r = verify_checkpoint(write_ct(tmp_path / "q", "int8", "int8", dtype=torch.float32))
    assert r.errors == [] and r.info["run"]["logits_dtype"] == "float32"


def test_transposed_layer_is_caught_by_source_comparison(nvfp4_with_source, tmp_path):
    ckpt, src = nvfp4_with_source
    p = _copy(ckpt, tmp_path)
    name = "model.layers.1.self_attn.o_proj"  # square [64, 64], so shapes cannot catch it
    from quantkit.formats import get_format

    def transpose(t):
        from quantkit.export.ct_fp4 import nvfp4_from_ct, nvfp4_to_ct

        parts = {k.rpartition(".")[2]: v for k, v in t.items() if k.startswith(name + ".")}
        w = get_format("nvfp4").dequantize(nvfp4_from_ct(parts, (64, 64)), torch.bfloat16)
        q = get_format("nvfp4").quantize(w.t().contiguous(), parts["weight_global_scale"])
        for k, v in nvfp4_to_ct(q).items():
            t[f"{name}.{k}"] = v

    edit_tensors(p, transpose)
    assert verify_checkpoint(p, cheap=True).errors == []  # every header and scale is still valid
    r = verify_checkpoint(p, source=str(src), run=False)
    assert [(f.check, f.module) for f in r.errors] == [("source.rel_err", name)]
    assert "(transposed, mis-scaled or wrong source?)" in r.errors[0].message
    assert r.info["source"]["layers"][name]["rel_err"] > 1.0


def test_nan_in_a_float_weight_scale_is_an_error_and_decompresses_nonfinite(tmp_path):
    p = write_ct(tmp_path / "q", "int8", "int8", source=tmp_path / "src")
    edit_tensors(p, lambda t: t[f"{Q}.weight_scale"].view(-1)[0].fill_(float("nan")))
    r = verify_checkpoint(p, source=str(tmp_path / "src"), run=False)
    checks = {(f.check, f.module) for f in r.errors}
    assert ("tensors.scale", Q) in checks and ("source.nonfinite", Q) in checks


def test_zeroed_blocks_and_outlier_layers_are_warnings(nvfp4_with_source, tmp_path):
    ckpt, src = nvfp4_with_source
    p = _copy(ckpt, tmp_path)
    name = "model.layers.1.mlp.down_proj"

    def zero_some(t):
        t[f"{name}.weight_packed"][:8, :8] = 0  # rows 0-7, first block of 16 elements each

    edit_tensors(p, zero_some)
    r = verify_checkpoint(p, source=str(src), run=False)
    assert r.errors == []
    assert r.info["source"]["layers"][name]["zeroed_blocks"] == 8
    assert ("source.zero_blocks", name) in {(f.check, f.module) for f in r.warnings}


def test_dynamic_int8_activations_use_the_kl_tolerance(tmp_path):
    r = verify_checkpoint(write_ct(tmp_path / "q", "int8", "int8"))
    assert r.errors == []
    run = r.info["run"]
    assert set(run["runtime_tolerance"]) == {"kl_vs_fp32"} and run["runtime_tolerance"]["kl_vs_fp32"] >= 0.25
    assert run["fp32_reference"]["quantkit_kl"] <= run["runtime_tolerance"]["kl_vs_fp32"]
