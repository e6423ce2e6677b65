"""FP4/INT4 quality on SmolLM2-135M: weight reconstruction error and perplexity per config.

Weights are quantized from the bf16 checkpoint exactly as export would (fused q/k/v and gate/up
share one NVFP4 global scale), then dequantized into an fp32 copy of the model (fake quant,
weight-only unless the config names an activation format). Perplexity uses
quantkit.eval.perplexity on the held-out split, the same windows for every config.

    python bench/bench_fp4_quality.py [--windows 8] [--configs nvfp4,mxfp4_even,...]
writes bench/results/<--name, default fp4_quality>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from quantkit.arch import arch_info
from quantkit.eval import perplexity
from quantkit.formats import get_format
from quantkit.formats.search import mse_quantize
from quantkit.models import load_model
from quantkit.passes.quantize import Quantize
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
    "nvfp4_gptq": ("nvfp4", "gptq", None),
    "mxfp4_gptq": ("mxfp4", "gptq", None),
}
CALIB = {"n_samples": 16, "seq_len": 512}  # GPTQ calibration, the recipes' default


def quantize_weights(model, fmt_name: str, observer: str) -> dict[str, float]:
    """Fake-quantize every target linear of the bf16 model; weights come back as fp32 in place.

    Scales are computed on the bf16 weights (the checkpoint's dtype, as export does); the
    dequantized weights are kept in fp32 so the fp32 forward sees them unrounded.
    """
    arch = arch_info(model)
    fmt = get_format(fmt_name)
    names = Targets().select(model, arch)
    # the quantize pass's own rule: fused q/k/v and gate/up share the minimum global scale
    gs = Quantize(format=fmt_name)._global_scales(model, SimpleNamespace(arch=arch), names)
    deq, err, ref = {}, 0.0, 0.0
    for n in names:
        w = model.get_submodule(n).weight.detach()
        qt = mse_quantize(fmt, w, gs.get(n)) if observer == "mse" else fmt.quantize(w, gs.get(n))
        deq[n] = fmt.dequantize(qt, torch.float32)
        err += (deq[n] - w.float()).square().sum().item()
        ref += w.float().square().sum().item()
    model.float()
    for n, d in deq.items():
        model.get_submodule(n).weight.data.copy_(d)
    return {"weight_rel_err": (err / ref) ** 0.5, "n_linears": len(names)}


def gptq_weights(model, tok, fmt_name: str) -> dict[str, float]:
    """Run the gptq pass (fake mode) on the model; weight error against the original weights."""
    from quantkit.calib import load_calib
    from quantkit.context import Context
    from quantkit.nn.qlinear import QLinear
    from quantkit.passes.gptq import Gptq

    arch = arch_info(model)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in Targets().select(model, arch)}
    ctx = Context(model=model, tokenizer=tok, arch=arch, device=torch.device("cpu"), calib=load_calib(tok, **CALIB))
    Gptq(format=fmt_name, mode="fake").run(model, ctx)
    err = ref = 0.0
    for n, w in originals.items():
        q = model.get_submodule(n)
        assert isinstance(q, QLinear)
        err += (q.dequantized_weight(torch.float32) - w.float()).square().sum().item()
        ref += w.float().square().sum().item()
    return {"weight_rel_err": (err / ref) ** 0.5, "n_linears": len(originals), **CALIB}


def run_config(name: str, windows: int) -> dict:
    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    model.eval()
    row = {"config": name}
    t = time.time()
    if name == "bf16":
        model.float()  # bf16 weights, fp32 compute: the same forward as every quantized config
    else:
        fmt_name, observer, _act = CONFIGS[name]
        if observer == "gptq":
            stats = gptq_weights(model.float(), tok, fmt_name)
        else:
            stats = quantize_weights(model, fmt_name, observer)
        row.update(format=fmt_name, observer=observer, **stats)
    row["quantize_s"] = round(time.time() - t, 1)
    t = time.time()
    row["ppl"] = perplexity(model, tok, seq_len=512, max_windows=windows)
    row["ppl_s"] = round(time.time() - t, 1)
    return row


def write(rows: list[dict], windows: int, name: str = "fp4_quality") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = next((r["ppl"] for r in rows if r["config"] == "bf16"), None)
    out = {"model": "smollm2-135m", "eval": f"held-out split, {windows} windows x 512 tokens", "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2))
    lines = [f"# FP4/INT4 weight-only quality, SmolLM2-135M ({out['eval']})", "",
             "| config | weight rel. error | ppl | ppl / bf16 |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ppl'] / base:.3f}" if base else "-"
        lines.append(f"| {r['config']} | {r.get('weight_rel_err', 0):.4f} | {r['ppl']:.2f} | {ratio} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--configs", default="bf16," + ",".join(CONFIGS))
    p.add_argument("--name", default="fp4_quality", help="results file stem under bench/results/")
    args = p.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        rows.append(run_config(name, args.windows))
        print(json.dumps(rows[-1]), flush=True)
        write(rows, args.windows, args.name)
    return rows


if __name__ == "__main__":
    main()
