"""transform_config checks: it validates with compressed-tensors' TransformConfig, and the transform
matrices the checkpoint stores have the size of the dimension they act on.

compressed-tensors registers a transform as submodule ``<module>.<scheme>_<location>`` with a
square ``weight``; its size is in_features for input/weight_input, out_features for
output/weight_output, or the scheme's head_dim. Transforms fused into the weights
(weight_input/weight_output) leave no tensor, so only present tensors are size-checked, and a
missing online (input/output) transform is a warning.
"""

from __future__ import annotations

from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.result import VerifyResult
from quantkit.verify.schemes import matches

ONLINE = ("input", "output")


def check_transforms(ckpt: Checkpoint, result: VerifyResult) -> None:
    raw = ckpt.qc.get("transform_config")
    if not raw:
        return
    from compressed_tensors.transform import TransformConfig
    from pydantic import ValidationError

    try:
        cfg = TransformConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        result.error("config.transform", f"transform_config does not validate: {'.'.join(map(str, err['loc']))}: {err['msg']}")
        return
    for scheme_name, scheme in cfg.config_groups.items():
        for args in scheme.apply:
            location = str(getattr(args.location, "value", args.location))
            for mod in ckpt.modules.values():
                if not any(matches(mod, t) for t in args.targets) or any(matches(mod, t) for t in args.ignore):
                    continue
                if scheme.head_dim:
                    size = scheme.head_dim
                elif location in ("input", "weight_input"):
                    size = mod.in_features
                else:
                    size = mod.out_features
                key = f"{mod.name}.{scheme_name}_{location}.weight"
                if not ckpt.has(key):
                    if location in ONLINE:
                        result.warn("tensors.transform", f"online transform {scheme_name}_{location} has no stored "
                                    "matrix; engines must rebuild it", mod.name)
                    continue
                shape = tuple(ckpt.tensors[key].shape)
                if size is not None and shape != (size, size):
                    result.error("tensors.transform", f"transform {scheme_name}_{location} is {list(shape)}, "
                                 f"expected [{size}, {size}]", mod.name)
