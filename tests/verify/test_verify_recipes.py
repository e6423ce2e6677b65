"""verify passes on what every shipped recipe writes (tiny Llama, CLI apply), including the run checks."""

import json

import pytest
from typer.testing import CliRunner

from quantkit.cli import app
from quantkit.recipe import recipes_dir

runner = CliRunner()
FAST = ["--set", "calib.n_samples=2", "--set", "calib.seq_len=32", "--no-eval"]
# MASA writes quantkit's own layout and needs more than a tiny model's two layers per atom group;
# every other shipped recipe is checked (llm-int8 is quantkit's layout too)
SKIPPED = {"masa-20", "masa-50"}
RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml") if p.stem not in SKIPPED)
# the QuantVLA recipes target a VLA's DiT; on a decoder-only model their passes act on the LLM
EXTRA = {r: ["--set", "passes.2.scope=llm", "--set", "passes.3.scope=llm"] for r in ("quantvla-nvfp4", "quantvla-w4a8")}


def test_every_compressed_tensors_recipe_is_covered():
    assert len(RECIPES) == len(list(recipes_dir().glob("*.yaml"))) - len(SKIPPED) >= 11


@pytest.mark.parametrize("recipe", RECIPES)
def test_verify_passes_on_shipped_recipe_output(tmp_path, tiny_llama_dir, recipe):
    out = tmp_path / "out"
    applied = runner.invoke(app, ["apply", recipe, str(tiny_llama_dir), "-o", str(out), *FAST, *EXTRA.get(recipe, [])])
    assert applied.exit_code == 0, applied.stderr
    result = runner.invoke(app, ["verify", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["ok"] and report["errors"] == []
    run = report["info"]["run"]
    assert run["logits_dtype"] == "bfloat16"
    if report["quant_method"] == "compressed-tensors":
        assert run["runtime_rel_max_diff"] <= run["runtime_tolerance"]
