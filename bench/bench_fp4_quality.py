"""FP4/INT4 quality on SmolLM2-135M: weight reconstruction error and perplexity per config.

Weights are quantized from the bf16 checkpoint exactly as export would (fused q/k/v and gate/up
share one NVFP4 global scale), then dequantized into an fp32 copy of the model (fake quant,
weight-only unless the config names an activation format). Perplexity uses
quantkit.eval.perplexity on the held-out split, the same windows for every config.

    python bench/bench_fp4_quality.py [--windows 8] [--configs nvfp4,mxfp4_even,...]
writes bench/results/fp4_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantkit.arch import arch_info
from quantkit.eval import perplexity
from quantkit.formats import get_format
from quantkit.formats.search import mse_quantize
from quantkit.models import load_model
from quantkit.targets import Targets

RESULTS = Path(__file__).parent / "results"
# name -> (weight format, weight observer, activation format)
CONFIGS = {
    "nvfp4": ("nvfp4", "minmax", None),
    "nvfp4_mse": ("nvfp4", "mse", None),
    "mxfp4_floor": ("mxfp4_floor", "minmax", None),
    "mxfp4_even": ("mxfp4_even", "minmax", None),
    "mxfp4_rceil": ("mxfp4_rceil", "minmax", None),
    "mxfp4_ceil": ("mxfp4_ceil", "minmax", None),
    "mxfp4_mse": ("mxfp4", "mse", None),
    "int4": ("int4", "minmax", None),
}


def shared_global_scales(model, arch, names: list[str], fmt) -> dict[str, torch.Tensor]:
    """Per-linear global scale; fused groups (q/k/v, gate/up) take their minimum (vLLM needs one)."""
    gs = {n: fmt.weight_global_scale(model.get_submodule(n).weight.detach()) for n in names}
    if next(iter(gs.values()), None) is None:
        return gs
    for layer in range(arch.num_layers):
        for group in arch.fused_groups(layer):
            members = [n for n in group if n in gs]
            if members:
                low = torch.stack([gs[n] for n in members]).amin(0)
                for n in members:
                    gs[n] = low
    return gs


def quantize_weights(model, fmt_name: str, observer: str) -> dict[str, float]:
    """Fake-quantize every target linear in place; returns squared-error sums for the report."""
    arch = arch_info(model)
    fmt = get_format(fmt_name)
    names = Targets().select(model, arch)
    gs = shared_global_scales(model, arch, names, fmt)
    err, ref = 0.0, 0.0
    for n in names:
        lin = model.get_submodule(n)
        w = lin.weight.detach().to(torch.bfloat16)  # the checkpoint's own dtype
        qt = mse_quantize(fmt, w, gs[n]) if observer == "mse" else fmt.quantize(w, gs[n])
        deq = fmt.dequantize(qt, torch.float32)
        err += (deq - w.float()).square().sum().item()
        ref += w.float().square().sum().item()
        lin.weight.data.copy_(deq.to(lin.weight.dtype))
    return {"weight_rel_err": (err / ref) ** 0.5, "n_linears": len(names)}


def run_config(name: str, windows: int) -> dict:
    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    model = model.float().eval()
    row = {"config": name}
    t = time.time()
    if name != "bf16":
        fmt_name, observer, _act = CONFIGS[name]
        row.update(format=fmt_name, observer=observer, **quantize_weights(model, fmt_name, observer))
    row["quantize_s"] = round(time.time() - t, 1)
    row["ppl"] = perplexity(model, tok, seq_len=512, max_windows=windows)
    return row


def write(rows: list[dict], windows: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = next((r["ppl"] for r in rows if r["config"] == "bf16"), None)
    out = {"model": "smollm2-135m", "eval": f"held-out split, {windows} windows x 512 tokens", "rows": rows}
    (RESULTS / "fp4_quality.json").write_text(json.dumps(out, indent=2))
    lines = [f"# FP4/INT4 weight-only quality, SmolLM2-135M ({out['eval']})", "",
             "| config | weight rel. error | ppl | ppl / bf16 |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ppl'] / base:.3f}" if base else "-"
        lines.append(f"| {r['config']} | {r.get('weight_rel_err', 0):.4f} | {r['ppl']:.2f} | {ratio} |")
    (RESULTS / "fp4_quality.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--configs", default="bf16," + ",".join(CONFIGS))
    args = p.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        rows.append(run_config(name, args.windows))
        print(json.dumps(rows[-1]), flush=True)
        write(rows, args.windows)
    return rows


if __name__ == "__main__":
    main()
