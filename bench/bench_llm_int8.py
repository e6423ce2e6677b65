"""LLM.int8(): quantkit's OutlierLinear against bitsandbytes' Linear8bitLt, same run, same CPU.

1. Perplexity of SmolLM2-135M (bf16) on the held-out text with every block linear in
   LLM.int8() (lm_head kept 16-bit, as bitsandbytes does), for quantkit's modes and for
   bitsandbytes at threshold 6 and 0 (its "no decomposition"; quantkit spells that inf).
2. Forward latency of one linear at SmolLM2 shapes, eval mode, inputs with two outlier
   columns so both decompositions run: quantkit vs bitsandbytes vs nn.Linear (same dtype).
   Calls are interleaved; the primary number is CPU time per call on one thread, which a
   machine shared with other jobs does not inflate the way it inflates wall-clock time.

    python bench/bench_llm_int8.py [--windows 16] [--calib-samples 16] [--reps 25] [--threads 1]
                                   [--skip-ppl] [--skip-latency]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.carry import carry_sections, run_record  # noqa: E402
from bench.provenance import provenance, provenance_markdown  # noqa: E402
from quantkit.arch import arch_info  # noqa: E402
from quantkit.calib import load_calib
from quantkit.context import Context
from quantkit.eval import perplexity
from quantkit.export.quantkit_layout import set_module
from quantkit.models import load_model
from quantkit.nn.outlier_linear import OutlierLinear
from quantkit.passes.llm_int8 import LlmInt8

RESULTS = Path(__file__).parent / "results"
NAME = "llm_int8"
SHAPES = ((576, 576), (576, 1536), (1536, 576))  # (in, out): q/o, gate/up, down of SmolLM2-135M
TOKENS = (512, 2048)
OUTLIER_COLS = (3, 100)  # input columns scaled x20 so |x| >= 6 in every row
SEQ_LEN, BATCH = 512, 4
CALIB_SAMPLES = 16


def _quiet_bnb():
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return bnb


def bnb_linear(linear: nn.Linear, threshold: float) -> nn.Module:
    """bitsandbytes' LLM.int8 module for linear, quantized on the CPU, eval mode."""
    bnb = _quiet_bnb()
    mod = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        has_fp16_weights=False, threshold=threshold,
    )
    mod.load_state_dict(linear.state_dict())
    return mod.to("cpu").eval()  # .to() runs the int8 quantization


# -- perplexity ----------------------------------------------------------------------------


def _ctx(model, tokenizer, calib_samples: int = CALIB_SAMPLES) -> Context:
    ctx = Context(model=model, tokenizer=tokenizer, arch=arch_info(model), device=torch.device("cpu"))
    ctx.calib = load_calib(tokenizer, n_samples=calib_samples, seq_len=SEQ_LEN)
    ctx.batch_size = BATCH
    return ctx


def _ours(dense, tokenizer, calib_samples: int, **fields) -> tuple[nn.Module, dict]:
    model = copy.deepcopy(dense)
    ctx = _ctx(model, tokenizer, calib_samples)
    LlmInt8(**fields).run(model, ctx)
    rep = ctx.report["llm_int8"]
    return model, {"int8_share": rep["int8_share"]}


def _bnb(dense, tokenizer, threshold: float) -> tuple[nn.Module, dict]:
    model = copy.deepcopy(dense)
    ctx = Context(model=model, tokenizer=tokenizer, arch=arch_info(model), device=torch.device("cpu"))
    names = LlmInt8().select(model, ctx)  # the same linears as quantkit
    for name in names:
        set_module(model, name, bnb_linear(model.get_submodule(name), threshold))
    return model, {}


def perplexity_rows(windows: int, calib_samples: int) -> list[dict]:
    dense, tok = load_model("smollm2-135m", dtype=torch.bfloat16)
    n = calib_samples
    variants = [
        ("bf16 (no quantization)", lambda: (dense, {})),
        ("quantkit dynamic t=6", lambda: _ours(dense, tok, n, threshold=6.0)),
        ("quantkit dynamic t=6 bnb_compat", lambda: _ours(dense, tok, n, threshold=6.0, bnb_compat=True)),
        ("quantkit static t=6", lambda: _ours(dense, tok, n, threshold=6.0, outliers="static")),
        ("quantkit t=inf (no decomposition)", lambda: _ours(dense, tok, n, threshold=math.inf)),
        ("bitsandbytes t=6", lambda: _bnb(dense, tok, 6.0)),
        ("bitsandbytes t=0 (no decomposition)", lambda: _bnb(dense, tok, 0.0)),
    ]
    rows = []
    for label, build in variants:
        model, extra = build()
        start = time.perf_counter()
        ppl = perplexity(model, tok, seq_len=SEQ_LEN, max_windows=windows, batch_size=BATCH)
        rows.append({"variant": label, "ppl": ppl, "eval_s": round(time.perf_counter() - start, 1), **extra})
        print(f"  {label:40s} ppl {ppl:.3f}", flush=True)
        del model
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_delta_vs_bf16"] = r["ppl"] - base
    return rows


# -- latency -------------------------------------------------------------------------------


def _input(tokens: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(0))
    x[:, list(OUTLIER_COLS)] *= 20.0
    return x.to(dtype)


def _time(fns: dict, reps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall ms, CPU ms) per call. With one intra-op thread every op runs on this thread, so
    its CPU time is the work done, unaffected by time spent descheduled."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up (caches, allocator)
    for _ in range(reps):  # interleaved so load from other processes hits all alike
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[k].append((time.thread_time() - c0) * 1e3)
            wall[k].append((time.perf_counter() - w0) * 1e3)
    return wall, cpu


@torch.inference_mode()
def latency_rows(reps: int) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for in_f, out_f in SHAPES:
            lin = nn.Linear(in_f, out_f, bias=False)
            lin.weight.data = lin.weight.data.half().float()  # lossless for bitsandbytes' fp16 cast
            ours = OutlierLinear.from_linear(lin, threshold=6.0, bnb_compat=True).eval()
            peer = bnb_linear(lin, 6.0)
            dense = copy.deepcopy(lin).to(dtype)
            for tokens in TOKENS:
                x = _input(tokens, in_f, dtype)
                agree = ((ours(x).float() - peer(x).float()).norm() / peer(x).float().norm()).item()
                wall, cpu = _time({"quantkit": lambda: ours(x), "bnb": lambda: peer(x), "dense": lambda: dense(x)}, reps)
                c = {k: statistics.median(v) for k, v in cpu.items()}
                w = {k: statistics.median(v) for k, v in wall.items()}
                rows.append({
                    "dtype": str(dtype).removeprefix("torch."), "in": in_f, "out": out_f, "tokens": tokens,
                    **{f"{k}_cpu_ms": round(v, 3) for k, v in c.items()},
                    **{f"{k}_wall_ms": round(v, 3) for k, v in w.items()},
                    "bnb_over_quantkit": round(c["bnb"] / c["quantkit"], 2),
                    "dense_over_quantkit": round(c["dense"] / c["quantkit"], 2),
                    "bnb_over_quantkit_wall": round(w["bnb"] / w["quantkit"], 2),
                    "rel_diff_vs_bnb": agree,
                })
                print(f"  {rows[-1]['dtype']:8s} {in_f}x{out_f} T={tokens}: CPU ms quantkit {c['quantkit']:.2f}, "
                      f"bnb {c['bnb']:.2f}, dense {c['dense']:.2f}", flush=True)
    return rows


# -- output --------------------------------------------------------------------------------


def _markdown(result: dict) -> str:
    out = [f"# LLM.int8(): quantkit vs bitsandbytes {result['bitsandbytes']} (CPU)", ""]
    out.append(f"Machine: {result['machine']}, torch {result['torch']}. Measured in one run; the CPU "
               "was shared with other jobs.")
    if result.get("provenance"):
        out += ["", *provenance_markdown(result["provenance"], result["loadavg_end"])]
    for key, run in result.get("section_runs", {}).items():
        where = f"commit `{run['commit'][:12]}`, `{run['command']}`"
        if run.get("machine"):
            where += f", {run['machine']}"
        out.append(f"- {key}: measured by {where}")
    if result.get("perplexity"):
        out += ["", f"## SmolLM2-135M perplexity ({result['windows']} x {SEQ_LEN}-token held-out windows; "
                f"static columns and int8 shares from {result.get('calib_samples')} x {SEQ_LEN} calibration tokens)", "",
                "| variant | ppl | vs bf16 | int8 share of MACs (calibration) |", "|---|---|---|---|"]
        for r in result["perplexity"]:
            share = "" if r.get("int8_share") is None else f"{100 * r['int8_share']:.3f}%"
            out.append(f"| {r['variant']} | {r['ppl']:.3f} | {r['ppl_delta_vs_bf16']:+.3f} | {share} |")
    if result.get("latency"):
        out += ["", "## One linear, eval-mode forward, inputs with 2 outlier columns", "",
                f"Median over {result['reps']} interleaved calls of the CPU time per call ({result['threads']} "
                "thread), wall-clock median in brackets. Ratios are of CPU times; the last ratio column is "
                "the wall-clock one.", "",
                "| dtype | in x out | tokens | quantkit ms | bitsandbytes ms | nn.Linear ms | bnb / quantkit | "
                "nn.Linear / quantkit | bnb / quantkit (wall) | rel. diff vs bnb |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["latency"]:
            out.append(
                f"| {r['dtype']} | {r['in']}x{r['out']} | {r['tokens']} | {r['quantkit_cpu_ms']:.2f} "
                f"({r['quantkit_wall_ms']:.2f}) | {r['bnb_cpu_ms']:.2f} ({r['bnb_wall_ms']:.2f}) | "
                f"{r['dense_cpu_ms']:.2f} ({r['dense_wall_ms']:.2f}) | {r['bnb_over_quantkit']:.2f}x | "
                f"{r['dense_over_quantkit']:.2f}x | {r['bnb_over_quantkit_wall']:.2f}x | {r['rel_diff_vs_bnb']:.1e} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES,
                    help="calibration windows for static outlier columns and the int8-share report")
    # 1 by default: on a CPU shared with other jobs, multi-threaded eager ops wait on their
    # slowest thread at every op, which measures the scheduler more than the kernels
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    prov = provenance("bench/bench_llm_int8.py", argv)
    default_threads = torch.get_num_threads()
    bnb = _quiet_bnb()
    result = {
        "provenance": prov,
        "bitsandbytes": bnb.__version__, "torch": torch.__version__, "threads": args.threads,
        "machine": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}", "windows": args.windows,
        "reps": args.reps,
    }
    if not args.skip_latency:
        print("latency", flush=True)
        torch.set_num_threads(args.threads)
        result["threads"] = args.threads
        result["latency"] = latency_rows(args.reps)
        torch.set_num_threads(default_threads)  # perplexity is not a timing: use every core
    if not args.skip_ppl:
        print("perplexity", flush=True)
        result["calib_samples"] = args.calib_samples
        result["perplexity"] = perplexity_rows(args.windows, args.calib_samples)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["loadavg_end"] = os.getloadavg()
    # a skipped section keeps its last measured rows, which run measured them, and its settings
    carry_sections(result, RESULTS / f"{NAME}.json",
                   {"latency": ("threads", "reps"), "perplexity": ("windows", "calib_samples")},
                   run_record(prov, result["loadavg_end"]))
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(_markdown(result))
    return result


if __name__ == "__main__":
    main()
