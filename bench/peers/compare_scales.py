"""Where two NVFP4 W4A4 checkpoints of one model differ: per-layer ratios of their
input_global_scale (the activation scale calibration sets) and whether their weights are equal.

Plain safetensors, no model: used to explain a perplexity gap between quantkit and llm-compressor
when the weight codes agree.

    .venv/bin/python bench/peers/compare_scales.py bench/work/qk-NVFP4 bench/work/llmc-NVFP4 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(path: Path, suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                if k.endswith(suffixes):
                    out[k] = sf.get_tensor(k)
    return out


def compare(a: Path, b: Path) -> dict:
    ta = tensors(a, ("input_global_scale", "weight_packed", "weight_scale", "weight_global_scale"))
    tb = tensors(b, ("input_global_scale", "weight_packed", "weight_scale", "weight_global_scale"))
    common = sorted(set(ta) & set(tb))
    weights_equal = all(torch.equal(ta[k], tb[k]) for k in common if not k.endswith("input_global_scale"))
    # global scale = 448*6/amax, so a/b is the inverse ratio of the amax each tool observed
    per_layer = {k.removesuffix(".input_global_scale"): float(tb[k].float() / ta[k].float())
                 for k in common if k.endswith("input_global_scale")}
    by_kind: dict[str, list[float]] = {}
    for name, r in per_layer.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(r)
    summary = {kind: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
               for kind, v in sorted(by_kind.items())}
    ratios = list(per_layer.values())
    return {"a": str(a), "b": str(b), "tensors_compared": len(common), "weights_equal": weights_equal,
            "amax_ratio_a_over_b": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                    "n": len(ratios), "by_linear": summary},
            "per_layer": per_layer}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    res = compare(args.a, args.b)
    text = json.dumps({k: v for k, v in res.items() if k != "per_layer"}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
