"""A checkpoint directory opened for checking: config, tensor headers (lazy), module skeleton.

Tensor data is read only on demand, so the cheap checks cost the config plus the scales.
The module skeleton (names, classes, in/out features) comes from building the model on the
meta device from its config, which is how compressed-tensors and vLLM see the modules; when
transformers cannot build it, names and shapes are derived from the tensor names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.errors import QuantkitError

QUANT_METHODS = ("compressed-tensors", "quantkit")
# tensor suffixes that only a quantized module has
QUANTIZED_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "weight_shape", "weight_zero_point",
                      "input_global_scale", "input_scale", "input_zero_point", "weight_g_idx")


class VerifyInputError(QuantkitError):
    """The path given to verify is not a readable quantized checkpoint."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, F8_E4M3, U8, I8, I32, ...


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    classes: tuple[str, ...]  # the class and its bases, as compressed-tensors matches targets
    in_features: int | None = None
    out_features: int | None = None

    @property
    def is_linear(self) -> bool:
        return "Linear" in self.classes


class Checkpoint:
    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise VerifyInputError(f"{self.path} is not a checkpoint directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise VerifyInputError(f"{self.path} has no config.json; not a model checkpoint")
        try:
            self.config = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VerifyInputError(f"{cfg} is not valid JSON ({type(e).__name__})") from None
        qc = self.config.get("quantization_config")
        if not isinstance(qc, dict) or not qc:
            raise VerifyInputError(f"{cfg} has no quantization_config; not a quantized checkpoint")
        self.qc: dict = qc
        self.quant_method = qc.get("quant_method")
        if self.quant_method not in QUANT_METHODS:
            raise VerifyInputError(
                f"quant_method {self.quant_method!r} is not one verify checks; known: {', '.join(QUANT_METHODS)}")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise VerifyInputError(f"{self.path} has no .safetensors files")
        self.tensors: dict[str, TensorInfo] = {}
        self._file: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for f in files:
            try:
                with safe_open(f, "pt") as sf:
                    for key in sf.keys():
                        sl = sf.get_slice(key)
                        self.tensors[key] = TensorInfo(tuple(sl.get_shape()), sl.get_dtype())
                        self._file[key] = f
            except Exception as e:  # noqa: BLE001 - any unreadable header is bad input
                raise VerifyInputError(f"{f.name} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
        self.tp_plan: dict[str, str] = {}  # transformers' base_model_tp_plan, filled by the skeleton
        self.modules, self.tied, self.lm_head, self.skeleton_note = _skeleton(self)

    def get(self, name: str) -> torch.Tensor:
        f = self._file[name]
        if f not in self._handles:  # one open handle per file: reopening per tensor costs more than reading scales
            self._handles[f] = safe_open(f, "pt")
        return self._handles[f].get_tensor(name)

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def declared_dtype(self) -> str | None:
        """The dtype config.json declares ("bfloat16"), if any."""
        d = self.config.get("dtype") or self.config.get("torch_dtype")
        return str(d).removeprefix("torch.") if d else None

    def text_config(self) -> dict:
        return self.config.get("text_config") or self.config


def _skeleton(ckpt: Checkpoint) -> tuple[dict[str, ModuleInfo], bool, str | None, str | None]:
    """(modules by name, embeddings tied?, lm_head name, note when built from tensor names)."""
    try:
        return _meta_skeleton(ckpt) + (None,)
    except Exception as e:  # noqa: BLE001 - an unknown architecture still gets the tensor-level checks
        note = f"transformers could not build the model skeleton ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        mods = _tensor_skeleton(ckpt)
        tied = bool(ckpt.text_config().get("tie_word_embeddings", ckpt.config.get("tie_word_embeddings", False)))
        return mods, tied, ("lm_head" if "lm_head" in mods or tied else None), note


def _meta_skeleton(ckpt: Checkpoint) -> tuple[dict[str, ModuleInfo], bool, str | None]:
    import warnings

    import transformers.modeling_utils  # noqa: F401  (its import side effects must not run on meta)
    from transformers import AutoConfig, AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.from_pretrained(ckpt.path)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    ckpt.tp_plan = dict(getattr(text, "base_model_tp_plan", None) or {})
    mods: dict[str, ModuleInfo] = {}
    for name, m in model.named_modules():
        if not name:
            continue
        classes = tuple(c.__name__ for c in type(m).__mro__ if issubclass(c, torch.nn.Module))
        fin = fout = None
        if isinstance(m, torch.nn.Linear):
            fin, fout = m.in_features, m.out_features
        elif type(m).__name__ == "Conv1D":  # GPT-2: weight [in, out]
            fin, fout = m.weight.shape
        mods[name] = ModuleInfo(name, classes, fin, fout)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    lm_head = next((n for n, m in model.named_modules() if out_emb is not None and m is out_emb), None)
    return mods, tied, lm_head


def _tensor_skeleton(ckpt: Checkpoint) -> dict[str, ModuleInfo]:
    mods: dict[str, ModuleInfo] = {}
    for key, info in ckpt.tensors.items():
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight" and len(info.shape) == 2:
            out, inp = info.shape
            embedding = "embed" in owner or owner.rpartition(".")[2] in ("wte", "wpe")
            classes = ("Embedding", "Module") if embedding else ("Linear", "Module")
            mods[owner] = ModuleInfo(owner, classes, inp, out)
        elif leaf == "weight_packed" and owner not in mods:
            shape_key = f"{owner}.weight_shape"
            out, inp = info.shape[0], None
            if shape_key in ckpt.tensors:
                out, inp = (int(v) for v in ckpt.get(shape_key).tolist())
            elif info.dtype == "U8":  # two FP4 codes per byte
                inp = info.shape[1] * 2
            mods[owner] = ModuleInfo(owner, ("Linear", "Module"), inp, out)
    return mods
