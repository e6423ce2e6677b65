"""QuantVLA ATM + OHB on SmolLM2-135M: do they help an LLM, and by how much?

For W4A8 (int4 per-channel weights, int8 per-token activations) and NVFP4 W4A4, the shipped
recipes' layout is applied (every decoder linear; SmolLM2 has no DiT), then ATM and OHB with
scope llm. Each variant is compared with the layout-only peer measured in the same run:
mean token KL vs the bf16->fp32 original on held-out windows, and perplexity.

    .venv/bin/python bench/bench_quantvla.py [--calib-samples 4 --calib-len 256 --eval-windows 8 --eval-len 256]

Writes bench/results/quantvla.json and quantvla.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, provenance_markdown  # noqa: E402
from quantkit.arch import arch_info  # noqa: E402
from quantkit.calib import load_calib
from quantkit.context import Context
from quantkit.eval import eval_windows
from quantkit.models import load_model
from quantkit.passes.calibrate import Calibrate
from quantkit.passes.quantize import Quantize
from quantkit.passes.quantvla import AttentionTemperature, HeadBalance
from quantkit.recipe import CalibConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RECIPES = {"W4A8 (int4_ch/int8)": "quantvla-w4a8.yaml", "NVFP4 W4A4": "quantvla-nvfp4.yaml"}
VARIANTS = ("layout", "layout+ATM", "layout+OHB", "layout+ATM+OHB")


def recipe_passes(path: str) -> dict:
    """The recipe's quantize / ATM / OHB passes, with scope llm (a decoder-only model has no DiT)."""
    passes = {p.name: p for p in load_recipe(ROOT / "recipes" / path).passes}
    return {
        "quantize": passes["quantize"],
        "atm": passes["attention_temperature"].model_copy(update={"scope": "llm"}),
        "ohb": passes["head_balance"].model_copy(update={"scope": "llm"}),
    }


@torch.inference_mode()
def teacher_eval(model, windows: torch.Tensor, batch: int) -> tuple[float, list[torch.Tensor]]:
    """Perplexity of the original, plus its log-probs per batch (kept for KL)."""
    nll, n, logps = 0.0, 0, []
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        nll -= lp[:, :-1].gather(-1, ids[:, 1:, None]).sum().item()
        n += ids[:, 1:].numel()
        logps.append(lp)
    return math.exp(nll / n), logps


@torch.inference_mode()
def student_eval(model, windows: torch.Tensor, batch: int, ref_logps: list[torch.Tensor]) -> dict:
    """Perplexity and mean token KL(original || model) on the same windows."""
    nll, kl, n_nll, n_kl = 0.0, 0.0, 0, 0
    for j, i in enumerate(range(0, windows.shape[0], batch)):
        ids = windows[i : i + batch]
        lp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        nll -= lp[:, :-1].gather(-1, ids[:, 1:, None]).sum().item()
        n_nll += ids[:, 1:].numel()
        ref = ref_logps[j]
        kl += (ref.exp() * (ref - lp)).sum().item()
        n_kl += ids.numel()
    return {"ppl": math.exp(nll / n_nll), "kl": kl / n_kl}


def summary(ctx: Context) -> dict:
    out = {}
    atm = ctx.report.get("attention_temperature")
    if atm:
        out["alpha"] = {k: atm[k] for k in ("heads", "neutral", "clipped", "alpha_min", "alpha_max")}
    ohb = ctx.report.get("head_balance")
    if ohb:
        out["beta"] = {k: ohb[k] for k in ("modules", "neutral", "beta_min", "beta_max")}
    return out


def write(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta["loadavg_end"] = os.getloadavg()
    (RESULTS / "quantvla.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# QuantVLA ATM + OHB on SmolLM2-135M (scope llm)",
        "",
        f"fp32 original: perplexity {meta['ppl_fp']:.3f}. Calibration {meta['calib']}, evaluation {meta['eval']}.",
        "Ratios are against the layout-only peer of the same format, measured in the same run.",
        "",
        "| format | variant | mean KL | KL / layout | ppl | ppl / layout "
        "| α range (neutral/heads) | β range (neutral/layers) | calib s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r.get("alpha"), r.get("beta")
        a_txt = f"{a['alpha_min']:.3f}–{a['alpha_max']:.3f} ({a['neutral']}/{a['heads']})" if a else "—"
        b_txt = f"{b['beta_min']:.3f}–{b['beta_max']:.3f} ({b['neutral']}/{b['modules']})" if b else "—"
        lines.append(
            f"| {r['format']} | {r['variant']} | {r['kl']:.4f} | {r['kl_ratio']:.3f} | {r['ppl']:.3f} | "
            f"{r['ppl_ratio']:.4f} | {a_txt} | {b_txt} | {r['calib_seconds']:.0f} |"
        )
    lines += ["", f"Machine: {meta['machine']}; total {meta['seconds']:.0f} s.  ",
              *provenance_markdown(meta["provenance"], meta["loadavg_end"])]
    (RESULTS / "quantvla.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    prov = provenance("bench/bench_quantvla.py", argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    teacher, tok = load_model(args.model, dtype="fp32")
    arch = arch_info(teacher)
    calib_cfg = CalibConfig(n_samples=args.calib_samples, seq_len=args.calib_len, batch_size=args.batch)
    base = Context(model=teacher, tokenizer=tok, arch=arch, device=torch.device("cpu"), calib_config=calib_cfg,
                   batch_size=args.batch)
    # buffer + activation amax (NVFP4's static input global scale): collect_stats=True because the
    # bench drives each pass itself, so calibrate cannot see that a later pass needs the statistics.
    # They come from the full-precision teacher, the one base every variant of a format shares.
    Calibrate(collect_stats=True).run(teacher, base)
    windows = eval_windows(teacher, tok, seq_len=args.eval_len, max_windows=args.eval_windows)
    ppl_fp, ref_logps = teacher_eval(teacher, windows, args.batch)
    print(f"fp32 ppl {ppl_fp:.3f}", flush=True)
    teacher_cache = {"teacher_std": {}, "teacher_rms": {}, "heads": {}}  # shared: one teacher pass in all

    def context(model) -> Context:
        return Context(model=model, tokenizer=tok, arch=arch, device=torch.device("cpu"), calib=base.calib,
                       batch_size=args.batch, teacher=teacher, calib_config=calib_cfg,
                       stats={"act_amax": base.stats["act_amax"], "quantvla": dict(teacher_cache)})

    meta = {
        "provenance": prov,
        "model": args.model, "ppl_fp": ppl_fp,
        "calib": f"{args.calib_samples} x {args.calib_len} tokens",
        "eval": f"{windows.shape[0]} x {args.eval_len} tokens",
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    rows = []
    for fmt, recipe in RECIPES.items():
        p = recipe_passes(recipe)
        layout = copy.deepcopy(teacher)
        p["quantize"].run(layout, context(layout))
        models = {"layout": (layout, None, 0.0)}

        def corrected(src, names, prior: Context | None = None):
            model = copy.deepcopy(src)
            ctx = context(model)
            if prior is not None:  # continue after ATM: keep its report rows
                ctx.report.update(copy.deepcopy(prior.report))
            t = time.perf_counter()
            for n in names:
                p[n].run(model, ctx)
            return model, ctx, time.perf_counter() - t

        models["layout+ATM"] = corrected(layout, ["atm"])
        models["layout+OHB"] = corrected(layout, ["ohb"])
        atm_model, atm_ctx, atm_s = models["layout+ATM"]
        both = corrected(atm_model, ["ohb"], atm_ctx)  # OHB measured after ATM (after_atm: true)
        models["layout+ATM+OHB"] = (both[0], both[1], both[2] + atm_s)
        for variant in VARIANTS:
            model, ctx, secs = models[variant]
            m = student_eval(model, windows, args.batch, ref_logps)
            rows.append({"format": fmt, "variant": variant, **m, "calib_seconds": secs,
                         **(summary(ctx) if ctx else {})})
            layout_row = next(r for r in rows if r["format"] == fmt and r["variant"] == "layout")
            rows[-1]["kl_ratio"] = rows[-1]["kl"] / layout_row["kl"]
            rows[-1]["ppl_ratio"] = rows[-1]["ppl"] / layout_row["ppl"]
            print(json.dumps(rows[-1]), flush=True)
            meta["seconds"] = time.perf_counter() - started
            write(rows, meta)
        del models
    meta["seconds"] = time.perf_counter() - started
    write(rows, meta)


if __name__ == "__main__":
    main()
