"""Config checks: schemes vLLM accepts, format names, ignore list, fused groups, kv cache, lm_head.

Produces the plan the tensor and shape checks work from: which scheme each module is under.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from quantkit.verify.checkpoint import QUANTIZED_SUFFIXES, Checkpoint, ModuleInfo
from quantkit.verify.result import VerifyResult
from quantkit.verify.schemes import ACT_QUANT_FORMATS, Scheme, classify, describe, matches, partial_component_match, resolve_group

# members of one fused group read the same input (vLLM fuses them into one kernel): sibling names in a block
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


@dataclass
class Plan:
    schemes: dict[str, Scheme] = field(default_factory=dict)  # group id -> scheme (groups that classify)
    formats: dict[str, str] = field(default_factory=dict)  # group id -> compression format
    quantized: dict[str, str] = field(default_factory=dict)  # module name -> group id
    fused: list[list[str]] = field(default_factory=list)  # fused groups of module names
    invalid_groups: int = 0  # groups that did not validate (their modules are not reported again)


def _valid_formats() -> set[str]:
    from compressed_tensors.config import CompressionFormat

    return {f.value for f in CompressionFormat}


def _validate_group(gid: str, raw: dict, result: VerifyResult) -> dict | None:
    """The group as compressed-tensors' QuantizationScheme parses it (defaults filled), or None."""
    from compressed_tensors.quantization import QuantizationScheme
    from pydantic import ValidationError

    try:
        return QuantizationScheme.model_validate(raw).model_dump(mode="json")
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        result.error("config.group", f"config group {gid} does not validate: {loc}: {err['msg']}")
    return None


def check_config(ckpt: Checkpoint, result: VerifyResult, allow_quantized_lm_head: bool = False) -> Plan:
    qc, plan = ckpt.qc, Plan()
    valid = _valid_formats()
    top_format = qc.get("format")
    if top_format is not None and top_format not in valid | {"mixed-precision"}:
        result.error("config.format", f"format {top_format!r} is not a compressed-tensors format; known: "
                     f"{', '.join(sorted(valid | {'mixed-precision'}))}")
    if qc.get("quantization_status") not in (None, "compressed"):
        result.error("config.status", f"quantization_status is {qc.get('quantization_status')!r}; a saved checkpoint "
                     "must be 'compressed' or engines re-quantize or misread it")
    raw_groups = qc.get("config_groups") or {}
    if not raw_groups:
        result.error("config.group", "quantization_config has no config_groups")
    targets: dict[str, list[str]] = {}
    for gid, raw in raw_groups.items():
        g = _validate_group(gid, raw, result)
        if g is None:
            plan.invalid_groups += 1
            continue
        targets[gid] = list(g.get("targets") or [])
        fmt = g.get("format") or top_format
        plan.formats[gid] = fmt
        if fmt not in valid:
            result.error("config.format", f"config group {gid}: format {fmt!r} is not a compressed-tensors format")
        s = classify(g.get("weights"), g.get("input_activations"))
        if s is None:
            result.error("config.scheme", f"config group {gid} ({describe(g.get('weights'), g.get('input_activations'))}) "
                         "matches no scheme vLLM's compressed-tensors loader accepts")
            continue
        plan.schemes[gid] = s
        if fmt in valid and fmt not in s.formats:
            result.error("config.format", f"config group {gid}: format {fmt!r} does not hold a {s.name} scheme "
                         f"(expected {' or '.join(s.formats)})")
        if s.acts is not None and fmt not in ACT_QUANT_FORMATS:
            result.warn("config.format", f"config group {gid}: {s.name} quantizes activations but format {fmt!r} is "
                        "weight-only in vLLM, which ignores input_activations and runs it as weight-only")
    if len({f for f in plan.formats.values()}) > 1 and top_format not in (None, "mixed-precision"):
        result.error("config.format", f"config groups use formats {sorted(set(plan.formats.values()))} but the top-level "
                     f"format is {top_format!r}, not 'mixed-precision'")
    ignore = list(qc.get("ignore") or [])
    _assign(ckpt, result, plan, targets, ignore)
    _check_ignore(ckpt, result, plan, ignore)
    _check_fused(ckpt, result, plan)
    _check_kv_cache(ckpt, result)
    _check_lm_head(ckpt, result, plan, allow_quantized_lm_head)
    _check_declared_dtype(ckpt, result, plan)
    result.info["schemes"] = {gid: {"scheme": s.name, "format": plan.formats.get(gid),
                                    "modules": sum(1 for g in plan.quantized.values() if g == gid)}
                              for gid, s in plan.schemes.items()}
    return plan


def _has_quantized_tensors(ckpt: Checkpoint, name: str) -> bool:
    return any(ckpt.has(f"{name}.{s}") for s in QUANTIZED_SUFFIXES)


def _assign(ckpt: Checkpoint, result: VerifyResult, plan: Plan, targets: dict[str, list[str]], ignore: list[str]) -> None:
    for name, mod in ckpt.modules.items():
        if not (mod.is_linear or _has_quantized_tensors(ckpt, name)):
            continue
        ignored = any(matches(mod, t) for t in ignore)
        hits = [] if ignored else resolve_group(mod, targets)
        if len(hits) > 1:
            result.warn("config.group", f"matched by config groups {hits} at the same priority; engines take one of them",
                        name)
        if hits:
            if hits[0] in plan.schemes:
                plan.quantized[name] = hits[0]
        elif _has_quantized_tensors(ckpt, name) and (ignored or not plan.invalid_groups):
            why = "it is in the ignore list" if ignored else "no config group targets it"
            result.error("config.ignore", f"has quantized tensors but {why}, so engines load it as a dense layer", name)


def _check_ignore(ckpt: Checkpoint, result: VerifyResult, plan: Plan, ignore: list[str]) -> None:
    for entry in ignore:
        hit = [m for m in ckpt.modules.values() if matches(m, entry)]
        if not hit:
            result.error("config.ignore", f"ignore entry {entry!r} matches no module")
            continue
        partial = [m.name for m in hit if partial_component_match(m.name, entry)]
        if partial:
            result.warn("config.ignore", f"ignore entry {entry!r} also matches {partial[0]!r}"
                        + (f" and {len(partial) - 1} more" if len(partial) > 1 else "")
                        + " by a prefix ending inside a name (re.match); end the pattern with '$' if that is unintended")


def fused_groups(modules: dict[str, ModuleInfo]) -> list[list[str]]:
    out = []
    for name in modules:
        parent, _, leaf = name.rpartition(".")
        for sib in FUSED_SIBLINGS:
            if leaf == sib[0]:
                members = [f"{parent}.{s}" if parent else s for s in sib]
                if all(m in modules for m in members):
                    out.append(members)
    return out


def _scheme_key(plan: Plan, name: str) -> str:
    gid = plan.quantized.get(name)
    if gid is None:
        return "unquantized"
    s = plan.schemes[gid]
    return json.dumps({"w": s.weights, "a": s.acts, "f": plan.formats.get(gid)}, sort_keys=True)


def _check_fused(ckpt: Checkpoint, result: VerifyResult, plan: Plan) -> None:
    plan.fused = fused_groups(ckpt.modules)
    for members in plan.fused:
        keys = {m: _scheme_key(plan, m) for m in members}
        if len(set(keys.values())) > 1:
            parts = ", ".join(f"{m.rpartition('.')[2]}: {plan.schemes[plan.quantized[m]].name if m in plan.quantized else 'unquantized'}"
                              for m in members)
            result.error("config.fused", f"fused group {members[0].rpartition('.')[0]} mixes schemes ({parts}); "
                         "vLLM requires all members of a fused layer to use the same scheme")


def _check_kv_cache(ckpt: Checkpoint, result: VerifyResult) -> None:
    kv = ckpt.qc.get("kv_cache_scheme")
    if not kv:
        return
    from compressed_tensors.quantization import QuantizationArgs
    from pydantic import ValidationError

    try:
        args = QuantizationArgs.model_validate(kv).model_dump(mode="json")
    except ValidationError as e:
        result.error("config.kv_cache", f"kv_cache_scheme does not validate: {e.errors()[0]['msg']}")
        return
    ok = (args.get("type") == "float" and args.get("num_bits") == 8 and args.get("symmetric", True)
          and not args.get("dynamic") and args.get("strategy") in ("tensor", "attn_head"))
    if not ok:
        result.error("config.kv_cache", f"kv_cache_scheme ({describe(args, None).removesuffix(', activations none')}) "
                     "is not one engines accept: FP8 (float8, symmetric, static, per tensor or per head)")
        return
    if not any(k.endswith((".k_scale", ".v_scale")) for k in ckpt.tensors):
        result.error("config.kv_cache", "kv_cache_scheme is static FP8 but the checkpoint has no k_scale/v_scale tensors")


def _check_lm_head(ckpt: Checkpoint, result: VerifyResult, plan: Plan, allow_quantized: bool) -> None:
    head = ckpt.lm_head
    if head is None:
        return
    quantized = head in plan.quantized or _has_quantized_tensors(ckpt, head)
    if quantized and not allow_quantized:
        result.error("config.lm_head", "lm_head is quantized; vLLM's compressed-tensors loader does not load a "
                     "quantized lm_head (add it to ignore, or pass --allow-quantized-lm-head if you meant it)", head)
    if ckpt.tied:
        if ckpt.has(f"{head}.weight") or quantized:
            result.error("config.lm_head", "config ties lm_head to the embeddings but the checkpoint stores a separate "
                         "lm_head (engines drop it, or untie and load it: the two disagree)", head)
    elif not (ckpt.has(f"{head}.weight") or quantized):
        result.error("config.lm_head", "embeddings are not tied but the checkpoint has no lm_head weight", head)


# compressed-tensors (0.20) decompresses FP4 weights to this dtype whatever the config declares;
# any other declared dtype makes transformers' forward fail ("expected m1 and m2 to have the same dtype")
FP4_DECOMPRESSED_DTYPE = "bfloat16"


def _check_declared_dtype(ckpt: Checkpoint, result: VerifyResult, plan: Plan) -> None:
    declared = ckpt.declared_dtype
    fp4 = sorted({s.name for s in plan.schemes.values() if s.name.startswith(("NVFP4", "MXFP4"))})
    if fp4 and declared is not None and declared != FP4_DECOMPRESSED_DTYPE:
        result.error("config.dtype", f"config declares {declared}, but compressed-tensors decompresses {fp4[0]} weights "
                     f"to {FP4_DECOMPRESSED_DTYPE}, so transformers' forward fails on mixed dtypes; declare "
                     f"{FP4_DECOMPRESSED_DTYPE}")
