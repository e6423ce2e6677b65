"""One writer protocol for every layout, fed block by block.

The layout is decided from the recipe before any weight loads (`layout_for(recipe)`); the block
loop hands each decoder block to `add_block` as soon as its passes are done, and everything
outside the blocks (embeddings, final norm, head) to `add_rest` at the end. Tensors go straight
to the shard writer; only the small per-module config entries are kept until `finish`, which
writes config.json (with its quantization_config), the generation config, the tokenizer and,
with several shards, the index.

Layouts:
  compressed-tensors  QLinear modules as compressed-tensors writes them (codecs in ct_int/ct_fp4)
  quantkit            quantkit-only modules (LLM.int8 outlier columns, MASA atoms), quantkit's layout
  dense               a plain transformers checkpoint (passes that only rewrite dense weights)
  bnb-int8            bitsandbytes' LLM.int8 layout (recipe output.layout; export/bnb.py)

A model without a transformers config (an nn.Module from a --loader) is written with its module
tree's tensor names and a config.json holding the class, any sub-model configs and the
quantization_config (docs/loaders.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.targets import hf_config
from quantkit.export.shards import DEFAULT_MAX_SHARD, ShardWriter, finalize

LAYOUTS = ("compressed-tensors", "quantkit", "dense", "bnb-int8")


def layout_for(passes) -> str:
    """The layout the recipe's passes produce, decided before loading; refuses impossible mixes."""
    produced = {getattr(p, "output_layout", None) for p in passes} - {None}
    if len(produced) > 1:
        raise QuantkitError(
            "this recipe mixes compressed-tensors layers with quantkit-only layers "
            f"({', '.join(sorted(produced))}); one checkpoint cannot hold both: split the recipe, or set "
            "output.save: false"
        )
    return produced.pop() if produced else "dense"


def output_layout(recipe) -> str:
    """The recipe's checkpoint layout: output.layout when it names one, else what the passes produce."""
    if recipe.output.layout == "bnb-int8":
        from quantkit.export.bnb import check_bnb_plan

        check_bnb_plan(recipe.passes)
        return "bnb-int8"
    return layout_for(recipe.passes)


FP4_DECOMPRESSED_DTYPE = "bfloat16"


def _has_fp4(schemes: dict[str, dict]) -> bool:
    return any(str(s.get("format", "")).startswith(("nvfp4", "mxfp4")) for s in schemes.values())


def layout_of_model(model: nn.Module) -> str:
    """The layout a model already in memory needs (for callers that quantized it by hand)."""
    from quantkit.export import quantkit_layout
    from quantkit.nn.qlinear import QLinear

    has_q = any(isinstance(m, QLinear) for m in model.modules())
    if quantkit_layout.has_quantkit_modules(model):
        if has_q:
            raise QuantkitError("this model mixes compressed-tensors layers with quantkit-only layers; one "
                                "checkpoint cannot hold both")
        return "quantkit"
    return "compressed-tensors" if has_q else "dense"


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


class CheckpointWriter:
    def __init__(self, out_dir: str | Path, layout: str, max_shard_bytes: int = DEFAULT_MAX_SHARD,
                 shard_tag: str = ""):
        if layout not in LAYOUTS:
            raise QuantkitError(f"unknown output layout {layout!r}; known: {', '.join(LAYOUTS)}")
        self.dir = Path(out_dir)
        self.layout = layout
        self.shards = ShardWriter(self.dir, max_shard_bytes, shard_tag=shard_tag)
        self.schemes: dict[str, dict] = {}  # compressed-tensors: scheme per quantized linear
        self.ignore: list[str] = []  # compressed-tensors: linears left unquantized
        self.modules: dict[str, dict] = {}  # quantkit layout: config per quantkit module; bnb-int8: threshold

    # -- per subtree -----------------------------------------------------------------------------
    def _entries(self, prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
        if self.layout == "compressed-tensors":
            from quantkit.export.compressed_tensors import module_tensors

            tensors, schemes, ignore = module_tensors(prefix, module)
            self.schemes.update(schemes)
            self.ignore.extend(ignore)
            return tensors
        if self.layout == "quantkit":
            from quantkit.export import quantkit_layout as ql

            tensors, modules = ql.module_tensors(prefix, module)
            self.modules.update(modules)
            return tensors
        if self.layout == "bnb-int8":
            from quantkit.export import bnb

            tensors, facts = bnb.module_tensors(prefix, module)
            self.modules.update({n: {"threshold": t} for n, t in facts["thresholds"].items()})
            self.ignore.extend(facts["dense"])  # linears left dense: bitsandbytes' skip list
            return tensors
        return dict(module.state_dict(prefix=prefix + "." if prefix else ""))

    def _write(self, tensors: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:
        for name in sorted(tensors):
            if name in skip:
                continue
            t = tensors[name]
            if t.device.type == "meta":
                raise QuantkitError(f"internal: {name} was never loaded (still on the meta device)")
            self.shards.add(name, t)

    def add_block(self, prefix: str, block: nn.Module) -> None:
        self._write(self._entries(prefix, block))

    def add_rest(self, model: nn.Module, block_prefixes: list[str]) -> None:
        """Everything outside the decoder blocks, whatever its module type."""
        blocks = set(block_prefixes)
        skip = tied_names(model)  # tied weights are stored once, under the input embedding's name
        for name, child in _outside(model, blocks):
            self._write(self._entries(name, child), skip)
        # parameters and buffers held directly by the containers above the blocks
        for container in _containers(model, blocks):
            dot = container + "." if container else ""
            mod = model.get_submodule(container) if container else model
            direct = {dot + k: v for k, v in mod._parameters.items() if v is not None}
            direct.update({dot + k: v for k, v in mod._buffers.items()
                           if v is not None and k not in mod._non_persistent_buffers_set})
            self._write(direct, skip)

    def merge(self, others: list[tuple[dict, list, dict]]) -> None:
        """Config entries written by other ranks' writers: (schemes, ignore, modules) each."""
        for schemes, ignore, modules in others:
            self.schemes.update(schemes)
            self.ignore.extend(ignore)
            self.modules.update(modules)

    # -- the end ---------------------------------------------------------------------------------
    def close_shards(self) -> list[tuple[str, dict]]:
        return self.shards.close()

    def finish(self, model: nn.Module, tokenizer, shard_lists: list[list[tuple[str, dict]]] | None = None) -> dict:
        """Name shards, write the index, config.json and tokenizer; -> the quantization_config or {}."""
        shards = shard_lists if shard_lists is not None else [self.close_shards()]
        flat = [s for lst in shards for s in lst]
        total = sum(e["data_offsets"][1] - e["data_offsets"][0] for _, h in flat for e in h.values())
        finalize(self.dir, flat, total)
        # config entries in the model's module order, however the blocks were split across writers
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        self.schemes = dict(sorted(self.schemes.items(), key=lambda kv: order.get(kv[0], len(order))))
        self.ignore = sorted(self.ignore, key=lambda n: order.get(n, len(order)))
        self.modules = dict(sorted(self.modules.items(), key=lambda kv: order.get(kv[0], len(order))))
        config = model.config.to_dict() if hf_config(model) is not None else module_tree_config(model)
        qc: dict = {}
        if self.layout == "compressed-tensors":
            from quantkit.export.compressed_tensors import config_from

            qc = config_from(self.schemes, self.ignore)
        elif self.layout == "quantkit":
            from quantkit.export import quantkit_layout as ql

            qc = ql.config_from(self.modules)
        elif self.layout == "bnb-int8":
            from quantkit.export import bnb

            qc = bnb.config_from({n: m["threshold"] for n, m in self.modules.items()}, self.ignore)
        if qc:
            config["quantization_config"] = qc
        else:
            config.pop("quantization_config", None)
        if self.layout == "compressed-tensors" and _has_fp4(self.schemes):
            # compressed-tensors decompresses FP4 weights to bf16 whatever the source dtype was; a
            # config declaring fp32/fp16 would make transformers' forward mix dtypes and fail
            config["dtype"] = FP4_DECOMPRESSED_DTYPE
            config.pop("torch_dtype", None)
        (self.dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.dir)
        return qc


def module_tree_config(model: nn.Module) -> dict:
    """config.json of a model without a transformers config: its class and its sub-models' configs.

    model_type "quantkit-module" makes transformers' Auto classes refuse it loudly; the checkpoint
    reloads into a model built by the same code (quantkit.loaders.load_checkpoint).
    """
    cls = type(model)
    outer: dict[str, dict] = {}  # outermost sub-models only: a backbone's children share its config
    for name, m in model.named_modules():
        if name and hf_config(m) is not None and not any(name.startswith(o + ".") for o in outer):
            outer[name] = m.config.to_dict()
    return {"model_type": "quantkit-module", "architectures": [cls.__name__],
            "module_class": f"{cls.__module__}.{cls.__qualname__}", "sub_configs": outer}


def tied_names(model: nn.Module) -> set[str]:
    """Names that tie_weights() fills from another tensor (e.g. lm_head.weight)."""
    if not getattr(hf_config(model), "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if isinstance(keys, (dict, list, tuple, set)) else set()


def _outside(model: nn.Module, blocks: set[str]):
    """Top-most modules that neither are, nor contain, nor lie inside a decoder block."""
    def contains_block(name: str) -> bool:
        dot = name + "." if name else ""
        return any(b.startswith(dot) for b in blocks) or not name

    out = []
    for name, module in model.named_modules():
        if not name or name in blocks or any(name.startswith(b + ".") for b in blocks):
            continue
        if contains_block(name):
            continue
        parent = name.rpartition(".")[0]
        if parent and not contains_block(parent):
            continue  # its parent is already listed
        out.append((name, module))
    return out


def _containers(model: nn.Module, blocks: set[str]) -> list[str]:
    """Modules on the path from the root to the blocks (the root included)."""
    names = {""}
    for b in blocks:
        parts = b.split(".")
        for i in range(1, len(parts)):
            names.add(".".join(parts[:i]))
    return sorted(n for n in names if n not in blocks)
