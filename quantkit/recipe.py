"""Recipes: a flat, ordered list of passes in YAML, validated before any weights load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantkit.errors import RecipeError
from quantkit.passes import PASSES, Pass


class CalibConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "default"  # shipped Wikipedia text, a local .txt/.jsonl/.parquet, or a hub dataset
    n_samples: int = Field(16, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    # which part of the source is read (quantkit/calib_sources.py)
    column: str | None = None  # default "text" ("messages" with chat_template)
    chat_template: bool = False  # a column of chat messages, rendered with the tokenizer's template
    split: str | None = None  # hub dataset split (default "train")
    subset: str | None = None  # hub dataset configuration name
    revision: str | None = None  # hub dataset revision (branch, tag or commit)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    seq_len: int = Field(512, ge=2)
    max_windows: int | None = Field(16, ge=1)
    # arithmetic of the in-stream evaluation: auto = fp32 for a 16-bit model on a CPU (exact
    # weights, 3-8x faster than bf16 matmuls on CPUs without native bf16), the model's dtype on GPUs
    compute_dtype: Literal["auto", "model", "float32"] = "auto"
    # mean token KL vs the original on held-out windows; 0 disables it. In the block loop it covers
    # every evaluation window (exact); with whole-model passes, the first kl_samples (top-k reference)
    kl_samples: int = Field(8, ge=0)


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    save: bool = True
    # auto: the layout the passes need (compressed-tensors, or quantkit's own); bnb-int8: the
    # bitsandbytes LLM.int8 checkpoint (llm_int8 pass, outliers: dynamic; quantkit/export/bnb.py)
    layout: Literal["auto", "bnb-int8"] = "auto"
    max_shard_size: str = "5GB"  # shards are flushed at this size, as transformers does


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str
    description: str = ""
    calib: CalibConfig = CalibConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    # whole: the model in memory; streaming: one decoder block at a time; auto: streaming when
    # the checkpoint would not comfortably fit in memory (and every pass can stream)
    execution: Literal["auto", "whole", "streaming"] = "auto"
    # streaming with host RAM short too: what stays resident between blocks (embeddings, head,
    # calibration hidden states) is memory-mapped from files in this directory (docs/streaming.md)
    offload_dir: str | None = None
    passes: list[Any]

    def to_dict(self) -> dict:
        data = self.model_dump(exclude={"passes"})
        data["passes"] = [{"pass": p.name, **p.model_dump()} for p in self.passes]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(where: str, prefix: str, err: ValidationError) -> RecipeError:
    e = err.errors()[0]
    loc = _loc(tuple(e["loc"]))
    place = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown field"
    if e["type"] == "literal_error" and "expected" in e.get("ctx", {}):
        msg = f"must be one of {e['ctx']['expected']}"
    value = e.get("input")
    shown = f" (got {value!r})" if e["type"] not in ("missing", "extra_forbidden") and not isinstance(value, dict) else ""
    return RecipeError(f"{where}: {place}: {msg}{shown}")


def _parse_pass(where: str, i: int, raw: Any) -> Pass:
    place = f"passes[{i}]"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: {place}: expected a mapping with a 'pass' key")
    raw = dict(raw)
    name = raw.pop("pass", None)
    if name is None:
        raise RecipeError(f"{where}: {place}: missing 'pass' (known: {', '.join(PASSES)})")
    if name not in PASSES:
        raise RecipeError(f"{where}: {place}.pass: unknown pass {name!r}; known: {', '.join(PASSES)}")
    try:
        return PASSES.get(name)(**raw)
    except ValidationError as err:
        raise _first_error(where, place, err) from None


def check_order(where: str, passes: list[Pass]) -> None:
    """Every pass's requirements must be provided by an earlier pass."""
    have: set[str] = set()
    providers = {fact: name for name, cls in PASSES.items() for fact in cls.provides}
    for i, p in enumerate(passes):
        missing = sorted(p.requirements() - have)
        if missing:
            fact = missing[0]
            hint = f"; add a '{providers[fact]}' pass before it" if fact in providers else ""
            raise RecipeError(f"{where}: passes[{i}] ({p.name}) requires {fact!r}, which no earlier pass provides{hint}")
        have |= p.provided_facts()


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """--set key=value with dotted keys; list items by index: passes.1.format=nvfp4."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key=value")
        parsed = yaml.safe_load(value) if value else None
        node: Any = data
        parts = key.split(".")
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"--set {key}: {part!r} is not an index into a list of {len(node)}")
                if last:
                    node[int(part)] = parsed
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = parsed
                else:
                    node = node.setdefault(part, {})
            else:
                raise RecipeError(f"--set {key}: cannot descend into {'.'.join(parts[:j])}")
    return data


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping at the top level")
    raw_passes = data.get("passes")
    if not isinstance(raw_passes, list) or not raw_passes:
        raise RecipeError(f"{where}: passes: expected a non-empty list of passes")
    passes = [_parse_pass(where, i, p) for i, p in enumerate(raw_passes)]
    rest = {k: v for k, v in data.items() if k != "passes"}
    try:
        recipe = Recipe(**rest, passes=passes)
    except ValidationError as err:
        raise _first_error(where, "", err) from None
    check_order(where, passes)
    _check_plan(where, recipe)
    return recipe


def _check_plan(where: str, recipe: Recipe) -> None:
    """What can be decided before any weight loads: the output layout and whether the passes stream."""
    from quantkit.errors import QuantkitError
    from quantkit.export.writer import layout_for
    from quantkit.stream.plan import check_streamable

    if recipe.output.save:
        try:
            layout_for(recipe.passes)
        except QuantkitError as e:
            raise RecipeError(f"{where}: {e}") from None
    if recipe.execution == "streaming":
        check_streamable(recipe.passes, where)
    if recipe.offload_dir is not None and recipe.execution == "whole":
        raise RecipeError(f"{where}: offload_dir needs execution: streaming (it offloads what streaming keeps "
                          "between blocks)")
    if recipe.output.save:
        _check_folds(where, recipe)
    _check_pass_rules(where, recipe)


def _check_pass_rules(where: str, recipe: Recipe) -> None:
    """Each pass type's own rules about its place in the recipe (Pass.recipe_problem: rotate, awq)."""
    from quantkit.errors import QuantkitError
    from quantkit.export.writer import layout_for

    try:
        layout = "bnb-int8" if recipe.output.layout == "bnb-int8" else layout_for(recipe.passes)
    except QuantkitError:
        layout = "mixed"
    for cls in dict.fromkeys(type(p) for p in recipe.passes):
        problem = cls.recipe_problem(recipe.passes, recipe.output.save, layout)
        if problem:
            raise RecipeError(f"{where}: {problem}")


def _check_folds(where: str, recipe: Recipe) -> None:
    """ATM/OHB fold per-row gains into weights; only integer scales absorb them exactly, so the
    compressed-tensors writer would refuse at the end of the run: refuse the recipe now instead."""
    from quantkit.export.compressed_tensors import folds_exactly

    coded = [p for p in recipe.passes if getattr(p, "format", "") and not folds_exactly(str(p.format))]
    folds = [p for p in recipe.passes if p.name in ("attention_temperature", "head_balance") and getattr(p, "fold", False)]
    if coded and folds:
        raise RecipeError(
            f"{where}: {folds[0].name} folds per-row gains into {coded[0].format} weights, which compressed-tensors "
            "cannot store without re-rounding their scales; set output.save: false (accuracy study) or use an "
            "integer format"
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe_path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{where}: cannot read recipe ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise RecipeError(f"{where}: malformed YAML{at}: {problem}") from None
    if overrides:
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping at the top level")
        data = apply_overrides(data, overrides, where)
    return parse_recipe(data, where)


def recipes_dir() -> Path:
    from quantkit.paths import recipes_dir as shipped_recipes  # package data when installed

    return shipped_recipes()


def resolve_recipe_path(path: str | Path) -> Path:
    """A path, or the name of a shipped recipe (`int8-w8a8`)."""
    p = Path(path)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise RecipeError(f"recipe file {p} does not exist")
        return p
    shipped = recipes_dir() / f"{p.name}.yaml"
    if shipped.exists():
        return shipped
    raise RecipeError(f"recipe {path} does not exist (not a file, not a shipped recipe; see `quantkit recipes`)")
