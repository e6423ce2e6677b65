"""--offload-dir: resident tensors and calibration states memory-mapped from files, same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantkit.api import apply
from quantkit.cli import app
from quantkit.errors import RecipeError
from quantkit.recipe import load_recipe
from quantkit.stream.offload import OffloadStore, is_offloaded
from quantkit.stream.residency import StreamResidency

SMALL = ["calib.n_samples=4", "calib.seq_len=32", "calib.batch_size=2", "eval.enabled=false"]


def _checkpoint_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")}


def test_store_round_trips_bits_through_a_file(tmp_path):
    t = torch.randn(5, 7).to(torch.bfloat16)
    with OffloadStore(tmp_path) as store:
        mapped = store.put(t)
        assert torch.equal(mapped, t) and mapped.dtype == t.dtype
        assert is_offloaded(mapped, store) and not is_offloaded(t, store)
        assert len(store.files()) == 1 and store.files()[0].stat().st_size == t.numel() * 2
        store.drop(mapped)
        assert store.files() == [] and torch.equal(mapped, t)  # the mapping outlives the unlinked file
        folder = store.dir
    assert not folder.exists()


@pytest.mark.parametrize("recipe_name", ["nvfp4-w4a4", "masa-20"])
def test_offload_writes_identical_bytes_and_reads_resident_tensors_from_disk(recipe_name, tiny_llama_dir, tmp_path,
                                                                             monkeypatch):
    from quantkit.stream import loop

    recipe = load_recipe(recipe_name, overrides=SMALL)
    apply(recipe, str(tiny_llama_dir), output=tmp_path / "plain", execution="streaming")

    state: dict = {"resident": [], "calib": []}
    orig_onload, orig_run_block = StreamResidency.onload, loop.run_block

    def onload(self, prefix):
        orig_onload(self, prefix)
        state["store"] = self.offload
        embed, norm = self.model.get_input_embeddings().weight, self.model.model.norm.weight
        state["resident"].append((is_offloaded(embed, self.offload), is_offloaded(norm, self.offload),
                                  len(self.offload.files())))

    def run_block(module, hidden, calls):
        state["calib"].append(all(is_offloaded(h, state["store"]) for h in hidden))
        return orig_run_block(module, hidden, calls)

    monkeypatch.setattr(StreamResidency, "onload", onload)
    monkeypatch.setattr(loop, "run_block", run_block)
    offload = tmp_path / "offload"
    rep = apply(recipe, str(tiny_llama_dir), output=tmp_path / "off", offload_dir=offload)
    assert rep.details["execution"]["mode"] == "streaming"  # offload implies streaming under auto
    assert _checkpoint_files(tmp_path / "plain") == _checkpoint_files(tmp_path / "off")
    assert state["resident"] and all(e and n and files > 0 for e, n, files in state["resident"])
    assert state["calib"] and all(state["calib"])  # every block ran on calibration inputs read from files
    assert list(offload.iterdir()) == []  # the run's files are gone


def test_offload_with_whole_execution_is_refused():
    with pytest.raises(RecipeError, match="offload_dir needs execution: streaming"):
        load_recipe("int8-w8a16", overrides=["execution=whole", "offload_dir=/tmp/x"])


def test_cli_offload_dir_with_whole_is_a_one_line_usage_error(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(app, ["apply", "int8-w8a16", str(tiny_llama_dir), "-o", str(tmp_path / "o"),
                                      "--execution", "whole", "--offload-dir", str(tmp_path / "off")])
    assert result.exit_code == 2
    assert "offload_dir needs execution: streaming" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_offload_dir_runs_streaming(tiny_llama_dir, tmp_path):
    result = CliRunner().invoke(app, ["apply", "int8-w8a16", str(tiny_llama_dir), "-o", str(tmp_path / "o"),
                                      "--no-eval", "--set", "calib.seq_len=32", "--set", "calib.n_samples=2",
                                      "--offload-dir", str(tmp_path / "off")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "model.safetensors").exists()
    assert list((tmp_path / "off").iterdir()) == []
