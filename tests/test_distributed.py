"""Data-free recipes split across processes (torchrun, gloo): the same checkpoint as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit.stream.source import SafetensorsSource

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--set", "calib.n_samples=2", "--set", "calib.seq_len=32", "--no-eval", "--execution", "streaming",
        "--max-shard-size", "64KB"]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    src = SafetensorsSource(path)
    return {n: src.read(n) for n in src.names()}


@pytest.mark.parametrize("recipe", ["int8-w8a16", "nvfp4-w4a16"])
def test_two_processes_equal_one(recipe, tiny_llama_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "quantkit", "apply", recipe, str(tiny_llama_dir), "-o", str(one), *ARGS])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
          "-m", "quantkit", "apply", recipe, str(tiny_llama_dir), "-o", str(two), *ARGS])
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:  # bit for bit, whatever the dtype (float8 has no equality op)
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name
    assert json.loads((one / "config.json").read_text()) == json.loads((two / "config.json").read_text())
    index = json.loads((two / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)


def test_calibrated_recipes_refuse_to_split(tiny_llama_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29518", "-m", "quantkit", "apply", "nvfp4-w4a4", str(tiny_llama_dir),
                           "-o", str(tmp_path / "x"), *ARGS], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode != 0
    assert "only data-free recipes" in proc.stderr
    assert not (tmp_path / "x").exists()
