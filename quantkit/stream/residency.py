"""Where the model's weights live during a run: all resident, or one decoder block at a time.

`WholeResidency` is a model loaded the usual way (from_pretrained); onload/release do nothing.
`StreamResidency` is a skeleton built on the meta device (accelerate's init_empty_weights):
embeddings, final norm and head are read once and stay resident; a decoder block's tensors are
read from the checkpoint's shards when the block loop reaches it and dropped back to meta after
the writer has its final tensors. Both feed the same block loop, so both write the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantkit.errors import ModelLoadError
from quantkit.export.writer import tied_names
from quantkit.nn.dict_linear import DictLinear
from quantkit.stream.offload import OffloadStore
from quantkit.stream.source import SafetensorsSource


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def persistent_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by full name: what a checkpoint holds (tied ones once each name)."""
    return dict(module.state_dict(prefix=prefix, keep_vars=True))


class WholeResidency:
    streaming = False

    def __init__(self, model: nn.Module):
        self.model = model

    def onload(self, prefix: str) -> None:
        pass

    def release(self, prefix: str) -> None:
        pass


class StreamResidency:
    """Onload a block's tensors from safetensors shards; release them back to the meta device."""

    streaming = True

    def __init__(self, model: nn.Module, source: SafetensorsSource, block_prefixes: list[str],
                 device: torch.device = torch.device("cpu"), offload: OffloadStore | None = None):
        self.model, self.source, self.device = model, source, device
        self.offload = offload  # --offload-dir: resident tensors and calibration states memory-mapped from files
        self.block_prefixes = block_prefixes
        self._prefix_fix = self._find_prefix_fix()
        # checkpoints whose layout differs from the model's (e.g. per-expert MoE tensors that
        # transformers 5 fuses into 3-D parameters) load through transformers' own conversion
        # mapping, one block's source tensors at a time
        self._converted = self._conversion_groups()

    def _find_prefix_fix(self) -> str:
        """Checkpoints of a base model lack the head class's prefix (`model.`): map names if so."""
        names = list(persistent_tensors(self.model))
        if all(n in self.source for n in names[:8]):
            return ""
        base = getattr(self.model, "base_model_prefix", "")
        if base and all(n.removeprefix(base + ".") in self.source for n in names[:8] if n.startswith(base + ".")):
            return base + "."
        return ""

    def _conversion_groups(self) -> dict[str, list[str]] | None:
        tied = tied_names(self.model)
        wanted = [n for n in persistent_tensors(self.model) if n not in tied]
        if all(self._source_name(n) in self.source for n in wanted):
            return None
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self._mapping = get_model_conversion_mapping(self.model, None, None)
        renamings = [c for c in self._mapping if isinstance(c, WeightRenaming)]
        converters = [c for c in self._mapping if isinstance(c, WeightConverter)]
        meta = self.model.state_dict()
        groups: dict[str, list[str]] = {}
        for key in self.source.names():
            target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta)
            owner = next((p for p in self.block_prefixes if target.startswith(p + ".")), "")
            groups.setdefault(owner, []).append(key)
        return groups

    def _load_converted(self, group: str) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        state = {k: self.source.read(k) for k in self._converted.get(group, [])}
        config = LoadStateDictConfig(dtype=self.model.dtype, weight_mapping=self._mapping)
        convert_and_load_state_dict_in_model(self.model, state, config)
        module = self.model.get_submodule(group) if group else self.model
        for name, t in persistent_tensors(module, group + "." if group else "").items():
            if t.device.type == "meta" and (group or not self._in_block(name)) and name not in tied_names(self.model):
                raise ModelLoadError(f"streaming: the checkpoint gave no tensor for {name}")
            if t.device != self.device and t.device.type != "meta":
                owner, leaf = _owner(self.model, name)
                moved = t.to(self.device)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = nn.Parameter(moved, requires_grad=False)
                else:
                    owner._buffers[leaf] = moved

    def _source_name(self, name: str) -> str:
        return name.removeprefix(self._prefix_fix) if self._prefix_fix else name

    def _load(self, names: list[str]) -> None:
        for name in names:
            owner, leaf = _owner(self.model, name)
            current = owner._parameters.get(leaf)
            if current is None:
                current = owner._buffers.get(leaf)
            src = self._source_name(name)
            if src not in self.source:
                raise ModelLoadError(
                    f"streaming: the checkpoint has no tensor {src!r} for the model's {name!r} "
                    "(a renamed or fused layout; use --execution whole)"
                )
            value = self.source.read(src)
            if tuple(value.shape) != tuple(current.shape):
                raise ModelLoadError(f"streaming: {src} has shape {tuple(value.shape)}, the model expects "
                                     f"{tuple(current.shape)}")
            if value.dtype != current.dtype and current.dtype.is_floating_point:
                value = value.to(current.dtype)
            value = value.to(self.device)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[leaf] = value

    def load_resident(self) -> None:
        """Everything outside the decoder blocks: embeddings, final norm, head (tied head once)."""
        self._load_resident()
        self._place_non_persistent()
        if self.offload is not None:
            self._offload_resident()

    def _place_non_persistent(self) -> None:
        """Non-persistent buffers (rotary tables, masks) are built real on the CPU by the skeleton and
        never come from the checkpoint: with --device cuda they must follow the blocks to the device."""
        for module in self.model.modules():
            for leaf in module._non_persistent_buffers_set:
                b = module._buffers.get(leaf)
                if b is not None and b.device.type != "meta" and b.device != self.device:
                    module._buffers[leaf] = b.to(self.device)

    def _offload_resident(self) -> None:
        """Resident tensors (outside the blocks) replaced by copies memory-mapped from the offload dir."""
        tied = tied_names(self.model)
        for name, t in persistent_tensors(self.model).items():
            if self._in_block(name) or name in tied or t.device.type != "cpu":
                continue
            owner, leaf = _owner(self.model, name)
            mapped = self.offload.put(t, tag=name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(mapped, requires_grad=False)
            else:
                owner._buffers[leaf] = mapped
        if tied:
            self.model.tie_weights()

    def _load_resident(self) -> None:
        if self._converted is not None:
            self._load_converted("")
            if tied_names(self.model):
                self.model.tie_weights()
            return
        names = [n for n, t in persistent_tensors(self.model).items()
                 if not self._in_block(n) and t.device.type == "meta"]
        tied = tied_names(self.model)
        self._load([n for n in names if n not in tied])
        if tied:
            self.model.tie_weights()
        left = [n for n, t in persistent_tensors(self.model).items() if not self._in_block(n) and t.device.type == "meta"]
        if left:
            raise ModelLoadError(f"streaming: {left[0]} was not found in the checkpoint")

    def _in_block(self, name: str) -> bool:
        return any(name.startswith(p + ".") for p in self.block_prefixes)

    def onload(self, prefix: str) -> None:
        if self._converted is not None:
            self._load_converted(prefix)
            return
        block = self.model.get_submodule(prefix)
        self._load([n for n, t in persistent_tensors(block, prefix + ".").items() if t.device.type == "meta"])

    def release(self, prefix: str) -> None:
        block = self.model.get_submodule(prefix)
        for module in block.modules():
            for leaf, p in list(module._parameters.items()):
                if p is not None and p.device.type != "meta":
                    module._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for leaf, b in list(module._buffers.items()):
                if b is not None and leaf not in module._non_persistent_buffers_set and b.device.type != "meta":
                    module._buffers[leaf] = torch.empty_like(b, device="meta")
            # weights derived from released tensors and cached outside the buffers (DictLinear's
            # materialized W_l) would otherwise keep every released block's layer alive
            if isinstance(module, DictLinear):
                module.drop_cache()


def build_skeleton(model_dir: str | Path, dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model class on the meta device, with non-persistent buffers (rotary tables) real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        dtype = checkpoint_dtype(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.name_or_path = str(model_dir)
    return model.eval()


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype from_pretrained(dtype="auto") would give: the config's, else float32."""
    for key in ("dtype", "torch_dtype"):
        value = getattr(config, key, None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and hasattr(torch, value):
            return getattr(torch, value)
    return torch.float32
