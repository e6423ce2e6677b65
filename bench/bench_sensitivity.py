"""`quantkit sensitivity` on SmolLM2-135M: sweep wall time per format, and the budget recipe.

1. Full component + block sweep (ALL + 7 + 30 runs) at 16 x 512 held-out tokens, NVFP4 and
   MXFP4, weights only: wall time and process CPU time (the machine may be shared; CPU time / 2
   cores is what an idle 2-core machine would approach). The peer is the naive sweep that
   re-runs the whole model for every run (no block replay), timed on a few runs in the same
   process and extrapolated to the same 38 runs.
2. Budget recipe: at the average bits of uniform NVFP4 (and at 5 bits), the sensitivity-guided
   mixed-format assignment vs uniform NVFP4 vs a blind assignment (same budget, every module
   equally sensitive), measured on held-out windows disjoint from the sweep's.

    python bench/bench_sensitivity.py [--samples 16] [--seq-len 512] [--formats nvfp4,mxfp4]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from quantkit.analysis.budget import average_bits, measure_choice, plan_budget
from quantkit.analysis.checks import add_cross_format_check
from quantkit.analysis.report import write_reports
from quantkit.analysis.sensitivity import run_sensitivity, sweep_tokens
from quantkit.analysis.sweep import Sweep
from quantkit.arch import arch_info
from quantkit.formats import get_format
from quantkit.models import load_model
from quantkit.targets import Targets

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "sensitivity"
NAME = "sensitivity"
NAIVE_PROBES = ("block:29", "block:15", "block:1")  # runs timed without replay for the peer estimate
EXTRA_BUDGET = 5.0  # a second budget point, bits per weight


def _sweep(model, tok, fmt: str, args, out_dir: Path) -> tuple[object, dict]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_sensitivity(model, tok, format=fmt, mode="w4a16", isolation="component,block", metric="kl",
                             samples=args.samples, seq_len=args.seq_len, out_dir=out_dir, resume=True,
                             progress=True, model_name="smollm2-135m")
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
              "runs": len(result.runs), "runs_s": result.timings["runs_s"], "reference_s": result.timings["reference_s"]}
    return result, timing


def _naive_estimate(model, tok, args) -> dict:
    """Seconds per run without replay, measured on a few block runs (their cost with replay varies most)."""
    arch = arch_info(model)
    names = Targets().select(model, arch)
    tokens = sweep_tokens(model, tok, args.samples, args.seq_len)
    model.float()
    sweep = Sweep(model, arch, get_format("nvfp4"), tokens, names, act_quant=False)
    sweep.reference()
    out = {}
    for rid in NAIVE_PROBES:
        b = int(rid.split(":")[1])
        mods = [n for n in names if arch.role_of(n)[0] == b]
        for replay in (False, True):
            sweep.replay = replay
            m = sweep.measure(mods)
            out[f"{rid} replay={replay}"] = m.seconds
    model.to(torch.bfloat16)
    return out


def _budget(model, tok, result, args) -> dict:
    """Held-out comparison: windows after the sweep's, so the choice is not scored in-sample."""
    arch = arch_info(model)
    names = Targets().select(model, arch)
    tokens = sweep_tokens(model, tok, args.budget_samples, args.seq_len, offset=args.samples)
    model.float()
    sweep = Sweep(model, arch, get_format(result.format), tokens, names, act_quant=False)
    sweep.reference()
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    uniform = {n: result.format for n in names}
    rows = {"uniform": {"budget": None, "choice": uniform}}
    for budget in (average_bits(uniform, shapes), EXTRA_BUDGET):
        plan = plan_budget(result, model, arch, names, budget)
        rows[f"guided@{budget:.4g}"] = {"budget": budget, "choice": plan["guided"]}
        rows[f"blind@{budget:.4g}"] = {"budget": budget, "choice": plan["blind"]}
    out = {}
    for label, row in rows.items():
        m = measure_choice(sweep, model, arch, row["choice"])
        counts = {}
        for f in row["choice"].values():
            counts[f] = counts.get(f, 0) + 1
        out[label] = {"avg_bits": average_bits(row["choice"], shapes), "ppl": m.ppl, "kl": m.kl, "counts": counts,
                      "ppl_fp": sweep.ppl_fp}
        print(label, out[label], flush=True)
    model.to(torch.bfloat16)
    return out


def _markdown(data: dict) -> str:
    lines = [f"# sensitivity sweep, SmolLM2-135M, {data['samples']} x {data['seq_len']} tokens, {data['machine']}", "",
             "| format | runs | wall s | CPU s | CPU s / 2 cores | FP PPL | ALL PPL | ALL KL | top component | top block |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fmt, s in data["sweeps"].items():
        lines.append(f"| {fmt} | {s['runs']} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} | {s['cpu_s'] / 2:.0f} | "
                     f"{s['ppl_fp']:.3f} | {s['ppl_all']:.3f} | {s['kl_all']:.4f} | {s['top_component']} | {s['top_block']} |")
    if data.get("naive"):
        lines += ["", "Peer (no block replay) vs replay, seconds per block run:", "",
                  "| run | naive s | replay s | ratio |", "|---|---|---|---|"]
        for rid in NAIVE_PROBES:
            a, b = data["naive"][f"{rid} replay=False"], data["naive"][f"{rid} replay=True"]
            lines.append(f"| {rid} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    if data.get("checks"):
        lines += ["", "| check | nvfp4 | mxfp4 |", "|---|---|---|"]
        for cid, row in data["checks"].items():
            lines.append(f"| {cid} | {row.get('nvfp4', '')} | {row.get('mxfp4', '')} |")
    if data.get("budget"):
        lines += ["", f"Budget recipes on {data['budget_samples']} held-out windows disjoint from the sweep's:", "",
                  "| assignment | avg bits | PPL | KL | modules per format |", "|---|---|---|---|---|"]
        for label, r in data["budget"].items():
            counts = ", ".join(f"{k}:{v}" for k, v in sorted(r["counts"].items()))
            lines.append(f"| {label} | {r['avg_bits']:.4f} | {r['ppl']:.4f} | {r['kl']:.5f} | {counts} |")
    return "\n".join(lines) + "\n"


def _save(data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{NAME}.md").write_text(_markdown(data))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--formats", default="nvfp4,mxfp4")
    ap.add_argument("--budget-samples", type=int, default=8)
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args(argv)
    model, tok = load_model("smollm2-135m")
    data: dict = {"samples": args.samples, "seq_len": args.seq_len, "budget_samples": args.budget_samples,
                  "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                  "sweeps": {}}
    results = {}
    for fmt in args.formats.split(","):
        out_dir = RESULTS / f"sensitivity_{fmt}" if fmt == "nvfp4" else WORK / f"sensitivity_{fmt}"
        result, timing = _sweep(model, tok, fmt, args, out_dir)
        results[fmt] = (result, out_dir)
        all_run = result.run("all")
        data["sweeps"][fmt] = {**timing, "ppl_fp": result.ppl_fp, "ppl_all": all_run.ppl, "kl_all": all_run.kl,
                               "top_component": result.ranking("component")[0].component,
                               "top_block": result.ranking("block")[0].block,
                               "components": result.component_scores(), "blocks": result.block_scores()}
        _save(data)
    if len(results) > 1:
        add_cross_format_check([r for r, _ in results.values()])
        for r, d in results.values():
            write_reports(r, d)
    checks: dict[str, dict[str, str]] = {}
    for fmt, (r, _) in results.items():
        for c in r.checks:
            checks.setdefault(c.id, {})[fmt] = f"{c.passed} ({c.detail})"
    data["checks"] = checks
    _save(data)
    if not args.skip_naive:
        data["naive"] = _naive_estimate(model, tok, args)
        _save(data)
    if not args.skip_budget and "nvfp4" in results:
        data["budget"] = _budget(model, tok, results["nvfp4"][0], args)
        _save(data)
    return data


if __name__ == "__main__":
    main()
