"""Online input rotations in the compressed-tensors layout, as llm-compressor's QuIP modifier writes them.

A QLinear whose input is rotated at run time (`input_rotation`, set by the `rotate` pass) is
described by one transform scheme, named "v" as QuIPModifier names its input rotation:

  {"type": "hadamard", "head_dim": b, "precision": "torch.float32",
   "apply": [{"location": "input", ...}, {"location": "weight_input", "inverse": true, ...}]}

`weight_input` records that the weight was rotated offline (already fused, nothing to do on
load); `input` is the online op. Each rotated linear also stores the matrix compressed-tensors
registers for the online transform, ``<linear>.v_input.weight`` [b, b]: the +-1 Sylvester
Hadamard (compressed-tensors divides by sqrt(b) at run time).

Who applies it (docs/rotation.md): compressed-tensors' apply_transform_config and vLLM do;
transformers 5 does not (its compressed-tensors quantizer never reads transform_config);
quantkit's runtime does (QLinear.input_rotation; ct_reader sets it from this config).
"""

from __future__ import annotations

import torch

from quantkit.errors import ModelLoadError, QuantkitError

SCHEME = "v"  # llm-compressor QuIPModifier's name for the input-side rotation
PRECISION = torch.float32  # the online op's compute dtype (quantkit.nn.qlinear.rotate_input)


def tensor_name(linear: str, group: str = SCHEME) -> str:
    return f"{linear}.{group}_input.weight"


def transform_tensor(block: int) -> torch.Tensor:
    """The +-1 Sylvester Hadamard [b, b] compressed-tensors stores for an online hadamard transform."""
    from quantkit.nn.qlinear import sylvester

    return sylvester(block, torch.device("cpu")).to(PRECISION).clone()


def transform_config(rotated: dict[str, tuple[str, int]], quantized: list[str], ignore: list[str]) -> dict:
    """{} or the transform_config for these rotated linears (name -> (scheme name, block size)).

    One transform scheme per name, each with one block size (a scheme has one head_dim): the
    rotate pass names the default block "v" and each other block "v<block>". When one scheme
    covers every quantized linear it targets "Linear" minus the unquantized linears (the form
    QuIPModifier writes); otherwise each scheme names its linears.
    """
    if not rotated:
        return {}
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    by_group: dict[str, dict[str, int]] = {}
    for name, (group, block) in rotated.items():
        by_group.setdefault(group, {})[name] = block
    schemes = {}
    for group, members in sorted(by_group.items()):
        blocks = set(members.values())
        if len(blocks) > 1:
            raise QuantkitError(f"online rotations with different block sizes {sorted(blocks)} in transform scheme "
                                f"{group!r}; a compressed-tensors transform scheme holds one")
        if len(by_group) == 1 and set(members) == set(quantized):
            targets, skip = ["Linear"], list(ignore)
        else:
            targets, skip = sorted(members), []
        schemes[group] = TransformScheme(
            type="hadamard",
            head_dim=blocks.pop(),
            precision=PRECISION,
            apply=[
                TransformArgs(targets=targets, location="input", ignore=skip),
                TransformArgs(targets=targets, location="weight_input", inverse=True, ignore=skip),
            ],
        )
    return TransformConfig(config_groups=schemes).model_dump()


def online_input_blocks(qc: dict) -> list[tuple[list[str], list[str], int, str]]:
    """(targets, ignore, block, scheme name) of each online hadamard `input` transform in a quantization_config.

    Raises for transforms quantkit's runtime does not apply (other types, randomized, online
    output/attention transforms), so a checkpoint is never run with a transform silently skipped.
    """
    raw = qc.get("transform_config") or {}
    out = []
    for name, scheme in (raw.get("config_groups") or {}).items():
        for args in scheme.get("apply", []):
            location = args.get("location")
            if location in ("weight_input", "weight_output"):
                continue  # fused into the stored weights
            if scheme.get("type") != "hadamard" or scheme.get("randomize") or location != "input" \
                    or not scheme.get("head_dim"):
                raise ModelLoadError(f"transform {name} ({scheme.get('type')}, {location}) is not applied by quantkit's "
                                    "runtime: only non-random hadamard input transforms with a head_dim are")
            out.append((list(args.get("targets", [])), list(args.get("ignore", [])), int(scheme["head_dim"]), name))
    return out


def attach_online_transforms(model: torch.nn.Module, qc: dict) -> int:
    """Make a loaded model apply its checkpoint's online input rotations; -> how many linears.

    For models loaded by transformers (which ignores transform_config) and by quantkit's reader:
    a QLinear applies the rotation itself; any other Linear gets a forward pre-hook.
    """
    from quantkit.export.ct_reader import matches
    from quantkit.nn.qlinear import QLinear, rotate_input

    entries = online_input_blocks(qc)
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, QLinear)):
            continue
        hits = [(b, g) for targets, skip, b, g in entries
                if matches(name, module, targets) and not matches(name, module, skip)]
        if not hits:
            continue
        if len(hits) > 1:
            raise ModelLoadError(f"{name} is targeted by {len(hits)} online input transforms "
                                 f"({', '.join(g for _, g in hits)}); quantkit applies one per linear")
        block, group = hits[0]
        if getattr(module, "input_rotation", None):
            raise QuantkitError(f"{name} already applies an online input rotation")
        if module.in_features % block:
            raise ModelLoadError(f"transform block {block} does not divide {name}'s input dim {module.in_features}")
        module.input_rotation = block
        module.input_rotation_group = group
        if not isinstance(module, QLinear):
            module.register_forward_pre_hook(lambda _m, args, b=block: (rotate_input(args[0], b), *args[1:]),
                                             prepend=True)
        count += 1
    return count
