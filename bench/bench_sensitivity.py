"""`quantkit sensitivity` on SmolLM2-135M: sweep wall time per format, and the budget recipe.

1. Full component + block sweep (ALL + 7 + 30 runs) at 16 x 512 held-out tokens, NVFP4 and
   MXFP4, weights only: wall time and process CPU time (the machine may be shared; CPU time / 2
   cores is what an idle 2-core machine would approach). The peer is the naive sweep that
   re-runs the whole model for every run (no block replay): every run costs what a component
   run costs (those start at block 0 either way), measured in the same sweep.
2. Budget recipe: at the average bits of uniform NVFP4 (and at 5 bits), the sensitivity-guided
   mixed-format assignment vs uniform NVFP4 vs a blind assignment (same budget, every module
   equally sensitive), measured on held-out windows disjoint from the sweep's.

    python bench/bench_sensitivity.py [--samples 16] [--seq-len 512] [--formats nvfp4,mxfp4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, provenance_markdown  # noqa: E402
from quantkit.analysis import checks as C  # noqa: E402
from quantkit.analysis.budget import (
    CANDIDATES,
    SAME_BITS_CANDIDATES,
    average_bits,
    measure_choice,
    plan_budget,
    recipe_yaml,
)
from quantkit.analysis.checks import add_cross_format_check
from quantkit.analysis.report import write_reports
from quantkit.analysis.sensitivity import SensitivityResult, fp32_compute, run_sensitivity, sweep_tokens
from quantkit.analysis.sweep import TOPK, Sweep
from quantkit.arch import arch_info
from quantkit.formats import get_format
from quantkit.models import load_model
from quantkit.targets import Targets

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "sensitivity"
NAME = "sensitivity"
EXTRA_BUDGET = 5.0  # a second budget point, bits per weight


def _sweep(model, tok, fmt: str, args, out_dir: Path) -> tuple[object, dict]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_sensitivity(model, tok, format=fmt, mode="w4a16", isolation="component,block", metric="kl",
                             samples=args.samples, seq_len=args.seq_len, out_dir=out_dir, resume=True,
                             progress=True, model_name="smollm2-135m", threads=args.threads)
    full = [r.seconds for r in result.runs_of("component")] + [result.run("all").seconds]
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
              "runs": len(result.runs), "runs_s": result.timings["runs_s"], "reference_s": result.timings["reference_s"],
              "naive_runs_s": sum(full) / len(full) * len(result.runs)}
    return result, timing


def _budget(model, tok, result, args) -> dict:
    """Held-out comparison: windows after the sweep's, so the choice is not scored in-sample."""
    arch = arch_info(model)
    names = Targets().select(model, arch)
    tokens = sweep_tokens(model, tok, args.budget_samples, args.seq_len, offset=args.samples)
    # the model is used again afterwards: its own dtypes back (model.to(bf16) would round fp32 inv_freq)
    with fp32_compute(model):
        sweep = Sweep(model, arch, get_format(result.format), tokens, names, act_quant=False)
        sweep.reference()
        shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
        uniform = {n: result.format for n in names}
        rows = {"uniform": {"budget": None, "choice": uniform}}
        # at uniform NVFP4's own bits, upgrades must be paid for with MXFP4; at 5 bits only upgrades
        for budget, formats in ((average_bits(uniform, shapes), SAME_BITS_CANDIDATES), (EXTRA_BUDGET, CANDIDATES)):
            plan = plan_budget(result, model, arch, names, budget, list(formats))
            rows[f"guided@{budget:.4g}"] = {"budget": budget, "choice": plan["guided"]}
            recipe = recipe_yaml(plan["guided"], act_quant=False, name=f"smollm2-nvfp4-mixed-{budget:.4g}bits")
            (RESULTS / "sensitivity_nvfp4" / f"recipe_budget_{budget:.3g}bits.yaml").write_text(recipe)
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
    return out


def _topk_kl_check(model, tok, args) -> dict:
    """Compact (top-TOPK + tail) vs full-vocabulary KL for the ALL run on one held-out window."""
    from quantkit.analysis import sweep as S

    arch = arch_info(model)
    names = Targets().select(model, arch)
    tokens = sweep_tokens(model, tok, 1, args.seq_len)
    with fp32_compute(model):
        out = {}
        for label, full_max in (("compact", S.FULL_VOCAB_MAX), ("full", 10**9)):
            saved, S.FULL_VOCAB_MAX = S.FULL_VOCAB_MAX, full_max
            try:
                sw = Sweep(model, arch, get_format("nvfp4"), tokens, names, act_quant=False)
                sw.reference()
                out[label] = sw.measure(names).kl
            finally:
                S.FULL_VOCAB_MAX = saved
    out["compact_over_full"] = out["compact"] / out["full"]
    print("topk", out, flush=True)
    return out


def _reuse(model, tok, args) -> dict:
    """Re-render saved sweeps with the current report code, then redo the budget comparison."""
    data = json.loads((RESULTS / f"{NAME}.json").read_text())
    dirs = {"nvfp4": RESULTS / "sensitivity_nvfp4", "mxfp4": WORK / "sensitivity_mxfp4"}
    results = {f: SensitivityResult.from_dict(json.loads((d / "sensitivity.json").read_text()))
               for f, d in dirs.items() if (d / "sensitivity.json").exists()}
    for r in results.values():
        r.checks = C.single_result_checks(r) + C.cross_model_checks(r, None)
    add_cross_format_check(list(results.values()))
    for f, r in results.items():
        write_reports(r, dirs[f])
    data["checks"] = _checks(results)
    data["kl_topk_check"] = _topk_kl_check(model, tok, args)
    _save(data)
    data["budget_samples"] = args.budget_samples
    data["budget"] = _budget(model, tok, results["nvfp4"], args)
    _save(data)
    return data


def _checks(results: dict) -> dict[str, dict[str, str]]:
    checks: dict[str, dict[str, str]] = {}
    for fmt, r in results.items():
        for c in r.checks:
            checks.setdefault(c.id, {})[fmt] = f"{c.passed} ({c.detail})"
    return checks


def _markdown(data: dict) -> str:
    lines = [f"# sensitivity sweep, SmolLM2-135M, {data['samples']} x {data['seq_len']} tokens, {data['machine']}", "",
             f"Run KL from the reference's top-{data.get('kl_topk', '?')} tokens plus one tail bucket.", "",
             *(provenance_markdown(data["provenance"], data["loadavg_end"]) if data.get("provenance") else []),
             "| format | runs | wall s | CPU s | CPU s / 2 cores | FP PPL | ALL PPL | ALL KL | top component | top block |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fmt, s in data["sweeps"].items():
        lines.append(f"| {fmt} | {s['runs']} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} | {s['cpu_s'] / 2:.0f} | "
                     f"{s['ppl_fp']:.3f} | {s['ppl_all']:.3f} | {s['kl_all']:.4f} | {s['top_component']} | {s['top_block']} |")
    lines += ["", "Peer: the naive sweep (every run recomputes all blocks) vs block replay, summed run seconds:", "",
              "| format | naive s (est.) | replay s | ratio |", "|---|---|---|---|"]
    for fmt, s in data["sweeps"].items():
        lines.append(f"| {fmt} | {s['naive_runs_s']:.0f} | {s['runs_s']:.0f} | {s['naive_runs_s'] / s['runs_s']:.2f}x |")
    if data.get("checks"):
        lines += ["", "| check | nvfp4 | mxfp4 |", "|---|---|---|"]
        for cid, row in data["checks"].items():
            lines.append(f"| {cid} | {row.get('nvfp4', '')} | {row.get('mxfp4', '')} |")
    if data.get("kl_topk_check"):
        k = data["kl_topk_check"]
        lines += ["", f"KL from the compact reference (top-256 + tail) vs full vocabulary, ALL nvfp4, 1 window: "
                  f"{k['compact']:.5f} vs {k['full']:.5f} (ratio {k['compact_over_full']:.4f})"]
    if data.get("budget"):
        lines += ["", f"Budget recipes on {data['budget_samples']} held-out windows disjoint from the sweep's:", "",
                  "| assignment | avg bits | PPL | KL | modules per format |", "|---|---|---|---|---|"]
        for label, r in data["budget"].items():
            counts = ", ".join(f"{k}:{v}" for k, v in sorted(r["counts"].items()))
            lines.append(f"| {label} | {r['avg_bits']:.4f} | {r['ppl']:.4f} | {r['kl']:.5f} | {counts} |")
    return "\n".join(lines) + "\n"


def _save(data: dict) -> None:
    data["loadavg_end"] = os.getloadavg()
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
    ap.add_argument("--reuse", action="store_true", help="budget only: reuse the saved nvfp4 sweep and timings")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 is far faster on a shared, busy CPU")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    data: dict = {"provenance": provenance("bench/bench_sensitivity.py", argv), "samples": args.samples, "seq_len": args.seq_len, "budget_samples": args.budget_samples,
                  "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
                  "sweeps": {}, "kl_topk": TOPK}
    if args.reuse:
        return _reuse(model, tok, args)
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
        if fmt == "nvfp4" and not args.skip_budget:
            data["budget"] = _budget(model, tok, result, args)
            _save(data)
    if len(results) > 1:
        add_cross_format_check([r for r, _ in results.values()])
        for r, d in results.values():
            write_reports(r, d)
    data["checks"] = _checks({f: r for f, (r, _) in results.items()})
    _save(data)
    return data


if __name__ == "__main__":
    main()
