"""Shape checks: the group size divides in_features, packing fits, and the largest tensor-parallel
degree each quantized layer supports.

Column-parallel layers (q/k/v, gate/up) split out_features: each rank needs whole rows, and
q/k/v whole attention heads (vLLM replicates k/v heads when the degree exceeds their count).
Row-parallel layers (o, down) split in_features: each rank needs whole quantization groups and
whole packed words. The split of each layer comes from transformers' base_model_tp_plan when the
config has one, otherwise from the layer's name.
"""

from __future__ import annotations

import fnmatch

from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.config_checks import Plan
from quantkit.verify.result import VerifyResult

MAX_TP = 64  # degrees 1..MAX_TP are tried; heads (e.g. SmolLM2's 9) often allow 3 but not 2
ROWWISE_NAMES = ("o_proj", "down_proj", "out_proj", "fc2", "c_proj", "w2", "dense", "dense_4h_to_h")


def _split(ckpt: Checkpoint, name: str) -> str:
    """'colwise' or 'rowwise'."""
    for pattern, style in ckpt.tp_plan.items():
        # plan keys are relative to the base model ("layers.*.self_attn.q_proj")
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern):
            return "rowwise" if "rowwise" in style else "colwise"
    return "rowwise" if name.rpartition(".")[2] in ROWWISE_NAMES else "colwise"


def _heads(ckpt: Checkpoint, leaf: str) -> int | None:
    cfg = ckpt.text_config()
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    if leaf in ("q_proj", "o_proj", "out_proj"):  # o_proj's input is split along the query heads
        return heads
    if leaf in ("k_proj", "v_proj"):
        return cfg.get("num_key_value_heads") or heads
    return None


def _pack_elems(s, fmt: str) -> int:
    """Input elements per stored word (so a row-parallel shard must hold whole words)."""
    if s.name.startswith(("NVFP4", "MXFP4")):
        return 2
    if fmt == "pack-quantized":
        return 32 // s.weights["num_bits"]
    return 1


def check_shapes(ckpt: Checkpoint, result: VerifyResult, plan: Plan) -> None:
    per_layer: dict[str, int] = {}
    for name, gid in plan.quantized.items():
        mod, s = ckpt.modules[name], plan.schemes[gid]
        inp, out = mod.in_features, mod.out_features
        if inp is None or out is None:
            continue
        group = s.weights.get("group_size") if s.weights.get("strategy") in ("group", "tensor_group") else None
        if group and inp % group:
            result.error("shapes.group", f"group size {group} does not divide in_features {inp}", name)
            continue
        acts = s.acts or {}
        agroup = acts.get("group_size") if acts.get("strategy") in ("group", "tensor_group") else None
        if agroup and inp % agroup:
            result.error("shapes.group", f"activation group size {agroup} does not divide in_features {inp}; the "
                         "forward cannot split this layer's input into groups", name)
            continue
        pack = _pack_elems(s, plan.formats.get(gid) or "")
        if inp % pack:
            result.error("shapes.pack", f"in_features {inp} is not a multiple of {pack} ({s.name} packing)", name)
            continue
        split, leaf = _split(ckpt, name), name.rpartition(".")[2]
        heads = _heads(ckpt, leaf)
        ok_degrees = set()
        for t in range(1, MAX_TP + 1):
            if split == "colwise":
                ok = out % t == 0
                if heads and leaf == "q_proj":
                    ok = ok and heads % t == 0
                elif heads and leaf in ("k_proj", "v_proj"):
                    ok = heads % t == 0 or t % heads == 0  # k/v heads are replicated beyond their count
            else:
                shard = inp // t if inp % t == 0 else 0
                ok = shard > 0 and (not group or shard % group == 0) and shard % pack == 0
                if heads:
                    ok = ok and heads % t == 0
            if ok:
                ok_degrees.add(t)
        per_layer[name] = ok_degrees
    if per_layer:
        common = set.intersection(*per_layer.values())
        overall = max(common)
        # the layers that rule out the next larger degree any layer allows
        larger = sorted(t for t in set.union(*per_layer.values()) if t > overall)
        limiting = sorted(n for n, d in per_layer.items() if larger and larger[0] not in d)
        result.info["tensor_parallel"] = {"max_degree": overall, "degrees": sorted(common),
                                          "limited_by": limiting[:8],
                                          "per_layer": {n: max(d) for n, d in per_layer.items()}}
        if overall < 2:
            result.warn("shapes.tp", f"the checkpoint supports no tensor parallelism beyond 1 (limited by "
                        f"{limiting[0] if limiting else 'every layer'})")
