"""Which scheme a compressed-tensors config group is, in the terms vLLM's loader selects by.

vLLM's CompressedTensorsConfig picks a kernel scheme from the weight and input-activation
QuantizationArgs of the group a layer matches (strategy, bits, type, group size, symmetry,
dynamic), and reads input_activations only when the format is an activation-quantization
format. The predicates below restate those facts; a group that fits none of them is a checkpoint
vLLM refuses with "No compressed-tensors compatible scheme was found".

Matching follows compressed-tensors: a target is an exact module name, a "re:" regex applied with
re.match (a prefix match), or a class name anywhere in the module's MRO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantkit.verify.checkpoint import ModuleInfo

# formats whose config groups vLLM reads input_activations from
ACT_QUANT_FORMATS = ("naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized",
                     "mxfp4-pack-quantized")


@dataclass(frozen=True)
class Scheme:
    name: str  # NVFP4, NVFP4A16, MXFP4, MXFP4A16, W8A8-INT8, WNA16, W4A8-INT, FP8, FP8A16
    formats: tuple[str, ...]  # compression formats that hold it
    weights: dict
    acts: dict | None

    @property
    def static_input_scale(self) -> str | None:
        """The tensor a static activation scheme must carry, or None when activations are dynamic."""
        if self.acts is None:
            return None
        dyn = self.acts.get("dynamic")
        if self.name == "NVFP4":  # dynamic "local": per-block dynamic, global scale static
            return None if dyn is True else "input_global_scale"
        return None if dyn in (True, "local") else "input_scale"


def _get(args: dict | None, key: str, default=None):
    return default if args is None else args.get(key, default)


def classify(weights: dict | None, acts: dict | None) -> Scheme | None:
    if weights is None:
        return None
    bits, kind, strategy = _get(weights, "num_bits"), _get(weights, "type"), _get(weights, "strategy")
    group, sym, wdyn = _get(weights, "group_size"), _get(weights, "symmetric", True), _get(weights, "dynamic", False)
    if wdyn:
        return None  # vLLM has no dynamic-weight scheme
    abits, akind, astrat = _get(acts, "num_bits"), _get(acts, "type"), _get(acts, "strategy")
    agroup, asym, adyn = _get(acts, "group_size"), _get(acts, "symmetric", True), _get(acts, "dynamic", False)

    if kind == "float" and bits == 4 and strategy == "tensor_group" and group == 16 and sym:
        if acts is None:
            return Scheme("NVFP4A16", ("nvfp4-pack-quantized",), weights, None)
        if akind == "float" and abits == 4 and astrat == "tensor_group" and agroup == 16 and asym:
            return Scheme("NVFP4", ("nvfp4-pack-quantized",), weights, acts)
        return None
    if kind == "float" and bits == 4 and strategy == "group" and group == 32:
        if acts is None:
            return Scheme("MXFP4A16", ("mxfp4-pack-quantized",), weights, None)
        if akind == "float" and abits == 4 and agroup == 32 and adyn:
            return Scheme("MXFP4", ("mxfp4-pack-quantized",), weights, acts)
        return None
    if kind == "int" and strategy in ("channel", "group") and acts is None and bits in (4, 8):
        return Scheme("WNA16", ("pack-quantized", "marlin-24"), weights, None)
    if kind == "int" and bits == 8 and strategy in ("tensor", "channel") and sym and akind == "int" and abits == 8:
        if astrat == "token" and adyn is True:
            return Scheme("W8A8-INT8", ("int-quantized", "naive-quantized"), weights, acts)
        if astrat == "tensor" and not adyn:
            return Scheme("W8A8-INT8", ("int-quantized", "naive-quantized"), weights, acts)
        return None
    if kind == "int" and bits == 4 and strategy in ("group", "channel") and sym and akind == "int" and abits == 8 \
            and astrat == "token" and adyn is True:
        return Scheme("W4A8-INT", ("int-quantized", "pack-quantized"), weights, acts)
    if kind == "float" and bits == 8 and sym and strategy in ("tensor", "channel", "block"):
        if acts is None:
            return Scheme("FP8A16", ("float-quantized", "naive-quantized"), weights, None)
        if akind == "float" and abits == 8 and (adyn is True or (astrat == "tensor" and asym)):
            return Scheme("FP8", ("float-quantized", "naive-quantized"), weights, acts)
    return None


def describe(weights: dict | None, acts: dict | None) -> str:
    def one(a: dict | None) -> str:
        if a is None:
            return "none"
        return (f"{a.get('type')}{a.get('num_bits')} {a.get('strategy')}"
                + (f"/{a.get('group_size')}" if a.get("group_size") else "")
                + (" dynamic" if a.get("dynamic") is True else " local" if a.get("dynamic") == "local" else ""))
    return f"weights {one(weights)}, activations {one(acts)}"


# -- target matching ---------------------------------------------------------------------------
def match_name(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def matches(module: ModuleInfo, target: str) -> bool:
    return match_name(module.name, target) or target in module.classes


def partial_component_match(name: str, target: str) -> bool:
    """A "re:" target that matches `name` only up to the middle of a name component.

    re.match is a prefix match, so "re:.*mlp.gate" also selects "mlp.gate_proj": the match ends
    inside "gate_proj" rather than at a "." or at the end of the name.
    """
    if not target.startswith("re:"):
        return False
    m = re.match(target[3:], name)
    return m is not None and m.end() < len(name) and name[m.end()] != "." and name[m.end() - 1] != "."


def resolve_group(module: ModuleInfo, groups: dict[str, list[str]]) -> list[str]:
    """Group ids whose targets match the module, at vLLM's priority (exact name > regex > class)."""
    for kind in ("exact", "regex", "class"):
        hits = []
        for gid, targets in groups.items():
            for t in targets:
                hit = (kind == "exact" and not t.startswith("re:") and t == module.name) or \
                      (kind == "regex" and t.startswith("re:") and match_name(module.name, t)) or \
                      (kind == "class" and not t.startswith("re:") and t in module.classes)
                if hit:
                    hits.append(gid)
                    break
        if hits:
            return hits
    return []
