"""MASA under streaming: two sweeps (statistics, then apply), same bytes as whole-model, one block at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit.api import apply
from quantkit.errors import RecipeError
from quantkit.recipe import load_recipe
from quantkit.stream.residency import StreamResidency
from tests.tiny_models import tiny_config

# the original seven with separate q/k/v/o projections (phi3 packs qkv, gpt2 has Conv1D: masa refuses both)
MASA_ARCHS = ["llama", "qwen2", "mistral", "gemma", "opt"]
SMALL = ["calib.n_samples=4", "calib.seq_len=32", "calib.batch_size=2", "eval.enabled=false"]
N_LAYERS = 4  # more layers than the tiny default of 2, so the dictionaries have something to share
# the fit's other branches: kl grouping (logit-lens per block), refit (Grams), centering, uniform atoms
VARIANT = ["passes.1.grouping=kl", "passes.1.n_groups=2", "passes.1.refit=true", "passes.1.center=true",
           "passes.1.allocation=uniform", "passes.1.kl_max_tokens=100"]


def _checkpoint_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")}


def _save_tiny(arch: str, path: Path, tokenizer) -> Path:
    torch.manual_seed(0)
    config = tiny_config(arch, len(tokenizer))
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, N_LAYERS)
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2): one each
        config.layer_types = config.layer_types[:1] * N_LAYERS
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def masa_dirs(tmp_path_factory, smollm2_tokenizer):
    return {arch: _save_tiny(arch, tmp_path_factory.mktemp(f"masa-{arch}"), smollm2_tokenizer) for arch in MASA_ARCHS}


def _both(recipe, src: Path, tmp: Path) -> tuple[Path, Path]:
    outs = []
    for mode in ("whole", "streaming"):
        out = tmp / mode
        apply(recipe, str(src), output=out, execution=mode)
        outs.append(out)
    return outs[0], outs[1]


@pytest.mark.parametrize("arch", MASA_ARCHS)
@pytest.mark.parametrize("recipe_name", ["masa-20", "masa-50"])
def test_masa_streaming_and_whole_write_identical_bytes(arch, recipe_name, masa_dirs, tmp_path):
    whole, streaming = _both(load_recipe(recipe_name, overrides=SMALL), masa_dirs[arch], tmp_path)
    a, b = _checkpoint_files(whole), _checkpoint_files(streaming)
    assert a.keys() == b.keys() and any(k.endswith(".safetensors") for k in a)
    for name in a:
        assert a[name] == b[name], f"{name} differs between whole and streaming"
    assert b'"masa_bank"' in a["config.json"]  # the dictionaries were really written


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_masa_kl_grouping_and_refit_stream_identically(arch, masa_dirs, tmp_path):
    recipe = load_recipe("masa-20", overrides=SMALL + VARIANT)
    whole, streaming = _both(recipe, masa_dirs[arch], tmp_path)
    assert _checkpoint_files(whole) == _checkpoint_files(streaming)


def test_masa_checkpoint_from_streaming_loads_and_matches_whole_logits(masa_dirs, tmp_path):
    import quantkit  # noqa: F401  registers the quantkit layout with transformers

    whole, streaming = _both(load_recipe("masa-50", overrides=SMALL), masa_dirs["llama"], tmp_path)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(p).eval()(input_ids=ids).logits for p in (whole, streaming)]
    assert torch.isfinite(logits[1]).all()
    assert torch.equal(logits[0], logits[1])


def test_masa_streaming_holds_one_block_in_both_sweeps(masa_dirs, tmp_path, monkeypatch):
    """At every onload (sweep 1 and sweep 2) only the onloaded block is off the meta device."""
    counts = []
    orig = StreamResidency.onload

    def onload(self, prefix):
        orig(self, prefix)
        layers = self.model.get_submodule("model.layers")
        counts.append(sum(any(t.device.type != "meta" for t in b.state_dict().values()) for b in layers))

    monkeypatch.setattr(StreamResidency, "onload", onload)
    rep = apply(load_recipe("masa-50", overrides=SMALL), str(masa_dirs["llama"]), output=tmp_path / "o",
                execution="streaming")
    assert counts == [1] * (2 * N_LAYERS)  # two sweeps over four blocks, each block alone
    assert rep.details["execution"]["mode"] == "streaming"
    assert rep.details["masa"]["reduction"] >= 0.5


def test_masa_streaming_releases_materialized_weights(masa_dirs, tmp_path, monkeypatch):
    """A released block keeps no DictLinear's cached dense weight (it would hold every layer again)."""
    from quantkit.nn.dict_linear import DictLinear

    seen = []
    orig = StreamResidency.release

    def release(self, prefix):
        orig(self, prefix)
        block = self.model.get_submodule(prefix)
        seen.extend(m._dense for m in block.modules() if isinstance(m, DictLinear))

    monkeypatch.setattr(StreamResidency, "release", release)
    apply(load_recipe("masa-20", overrides=SMALL), str(masa_dirs["llama"]), output=tmp_path / "o",
          execution="streaming")
    assert len(seen) == 4 * N_LAYERS and all(d is None for d in seen)


def test_masa_streams_in_the_auto_plan():
    from quantkit.stream.plan import choose_execution

    passes = load_recipe("masa-20").passes
    mode, why = choose_execution("streaming", passes, None)
    assert mode == "streaming"


ROTATE_THEN_MASA = """
name: rotate-masa
passes:
  - pass: calibrate
  - pass: rotate
    block_size: 16  # the tiny models' head_dim
  - pass: masa
    ratio: 0.2
"""


def test_weight_changing_pass_before_masa_is_refused_when_streaming(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(ROTATE_THEN_MASA)
    with pytest.raises(RecipeError, match="cannot keep those changes between its two sweeps"):
        load_recipe(path, overrides=["execution=streaming"])


def test_weight_changing_pass_before_masa_runs_as_two_stages_when_whole(masa_dirs, tmp_path):
    from quantkit.stream.plan import choose_execution, stages

    path = tmp_path / "r.yaml"
    path.write_text(ROTATE_THEN_MASA)
    rotate_first = load_recipe(path).passes
    assert [[p.name for p in s] for s in stages(rotate_first)] == [["calibrate", "rotate"], ["masa"]]
    assert choose_execution("auto", rotate_first, None)[0] == "whole"
    rep = apply(load_recipe(path, overrides=SMALL), str(masa_dirs["llama"]), output=tmp_path / "o", execution="whole")
    assert rep.details["rotate"]["fused_vo_blocks"] == N_LAYERS and rep.details["masa"]["reduction"] >= 0.2
    calibrate_first = load_recipe("masa-20").passes
    assert [[p.name for p in s] for s in stages(calibrate_first)] == [["calibrate", "masa"]]
