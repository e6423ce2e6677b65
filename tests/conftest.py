"""Shared fixtures: tiny random models built from transformers configs, and the real default model."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import TINY_CONFIGS, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded default model as a local HF directory (converted once from the GGUF)."""
    from quantkit.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def cpu_without_bf16_gemm(monkeypatch):
    """The kernel chooser sees a CPU without native bf16 GEMM (AVX2: bf16 prefill tiles go through fp32),
    whatever this machine has (AVX512-BF16/AMX CPUs send prefill to the INT4 kernel instead)."""
    from quantkit.nn.kernels import select

    monkeypatch.setattr(select, "_cpu_bf16", lambda: False)


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama saved with SmolLM2's tokenizer: a real model directory for CLI tests."""
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


__all__ = ["TINY_CONFIGS", "tiny_model"]
