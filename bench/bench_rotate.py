"""The `rotate` pass on SmolLM2-135M: RTN vs rotate+RTN vs rotate+GPTQ at NVFP4A16 and MXFP4A16.

Every config runs quantkit's own passes (rotate, quantize, gptq) on the bf16 model in memory, as
`quantkit apply` would, with fake-mode QLinears; the model is then evaluated in fp32 (both sides of
every comparison: bf16 matmuls are 6-8x slower on this CPU). Data as bench_fp4_quality.py (its protocol copied below): the
calibration articles split by article into calibration (3 of 4) and development (every 4th);
the block size is chosen on the development perplexity, the held-out split is reported only.

Row kinds per scheme (run in this order across schemes: rtn and onlineB, fused64, +gptq, gptq):
  rtn             quantize, no rotation
  gptq            gptq (damping 0.01), no rotation
  fused64         rotate fuse_vo only (block 64 = head_dim): no online op, any engine serves it
  onlineB         rotate fuse_vo + online input rotation of every other block linear, block B
  onlineB*+gptq   the block B* with the best development ppl among onlineB, then GPTQ

    nice -n 10 .venv/bin/python bench/bench_rotate.py [--windows 4] [--dev-windows 4] [--schemes nvfp4a16,mxfp4a16]
writes bench/results/rotate.json and rotate.md (after every row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quantkit.arch import arch_info  # noqa: E402
from quantkit.context import Context  # noqa: E402
from quantkit.eval import perplexity  # noqa: E402
from quantkit.models import load_model  # noqa: E402
from quantkit.passes.gptq import Gptq  # noqa: E402
from quantkit.passes.quantize import Quantize  # noqa: E402
from quantkit.passes.rotate import Rotate  # noqa: E402
from quantkit.stream.loop import run_stage  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCHEMES = {"nvfp4a16": "nvfp4", "mxfp4a16": "mxfp4"}
BLOCKS = (16, 32, 64)
DAMPING = 0.01
# the dev/held-out protocol is bench_fp4_quality's (every 4th calibration article is development
# text), so the two benches score the same windows
from bench.bench_fp4_quality import (  # noqa: E402
    CALIB_SAMPLES, DEV_EVERY, SEED, SEQ_LEN, environment, ppl_of, split_calib_texts, window_nll, windows_of,
)


def run_config(scheme: str, kind: str, block: int, windows: int, dev: torch.Tensor, calib: torch.Tensor) -> dict:
    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    model.eval()
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"), calib=calib)
    passes = []
    if kind.startswith("fused"):
        passes.append(Rotate(block_size=block, fuse_vo=True, online=False))
    elif kind.startswith("online"):
        passes.append(Rotate(block_size=block, fuse_vo=True, online=True))
    fmt = SCHEMES[scheme]
    passes.append(Gptq(format=fmt, mode="fake", dampening=DAMPING) if kind.endswith("gptq")
                  else Quantize(format=fmt, mode="fake"))
    t = time.time()
    run_stage(passes, ctx)  # one block loop: rotate then quantize each block (GPTQ: on rotated inputs)
    row = {"scheme": scheme, "kind": kind, "block": block or None, "quantize_s": round(time.time() - t, 1),
           "online_linears": ctx.report.get("rotate", {}).get("online_linears", 0),
           "fused_vo_blocks": ctx.report.get("rotate", {}).get("fused_vo_blocks", 0)}
    model.float()  # fp32 compute; QLinear rebuilds its dense cache from the codes
    t = time.time()
    row["dev_ppl"] = ppl_of(window_nll(model, dev))
    row["heldout_ppl"] = perplexity(model, tok, seq_len=SEQ_LEN, max_windows=windows)
    row["eval_s"] = round(time.time() - t, 1)
    return row


def bf16_row(windows: int, dev: torch.Tensor) -> dict:
    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    model.eval().float()
    return {"scheme": "bf16", "kind": "-", "block": None, "quantize_s": 0.0, "dev_ppl": ppl_of(window_nll(model, dev)),
            "heldout_ppl": perplexity(model, tok, seq_len=SEQ_LEN, max_windows=windows)}


def write(out: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out["environment"]["machine"]["loadavg_now"] = os.getloadavg()
    (RESULTS / "rotate.json").write_text(json.dumps(out, indent=2) + "\n")
    rows = out["rows"]
    base = next((r for r in rows if r["scheme"] == "bf16"), None)
    lines = [f"# Block-diagonal Hadamard rotations, SmolLM2-135M ({out['eval']})", "",
             f"Calibration: {out['calib']}. fp32 compute for every row. The block size for `+gptq` is chosen "
             "on the development ppl; held-out ppl is reported, never used to choose.", "",
             "| scheme | config | block | online linears | fused v/o blocks | dev ppl | held-out ppl | Δppl held-out | "
             "Δ vs RTN | quantize s |", "|---|---|---|---|---|---|---|---|---|---|"]
    rtn = {r["scheme"]: r for r in rows if r["kind"] == "rtn"}
    for r in rows:
        d = r["heldout_ppl"] - base["heldout_ppl"] if base else None
        ref = rtn.get(r["scheme"])
        ratio = "-"
        if base and ref and r["scheme"] != "bf16":
            ratio = f"{d / (ref['heldout_ppl'] - base['heldout_ppl']):.2f}x"
        lines.append(f"| {r['scheme']} | {r['kind']} | {r['block'] or '-'} | {r.get('online_linears', 0)} | "
                     f"{r.get('fused_vo_blocks', 0)} | {r['dev_ppl']:.3f} | {r['heldout_ppl']:.3f} | "
                     f"{'-' if d is None else f'{d:+.3f}'} | {ratio} | {r['quantize_s']} |")
    if out.get("chosen"):
        lines += ["", "Block chosen on the development split: " +
                  ", ".join(f"{s}: {b}" for s, b in out["chosen"].items())]
    env = out["environment"]
    lines += ["", f"Commit {env['commit']} (tree dirty: {env['tree_dirty']}); command `{env['command']}`; "
              f"versions {env['versions']}; load average at start {env['machine']['loadavg_start']}, "
              f"at write {env['machine']['loadavg_now']} on {env['machine']['cpus']} CPUs (shared machine: timings "
              "are not comparable between rows)."]
    (RESULTS / "rotate.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens")
    p.add_argument("--dev-windows", type=int, default=4, help="development windows of 512 tokens")
    p.add_argument("--schemes", default="nvfp4a16,mxfp4a16")
    p.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
    p.add_argument("--no-gptq", action="store_true", help="skip the GPTQ rows (the slow ones)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    _, tok = load_model("smollm2-135m", dtype="bfloat16")
    calib_texts, dev_texts = split_calib_texts()
    calib = windows_of(tok, calib_texts, CALIB_SAMPLES, SEED)
    dev = windows_of(tok, dev_texts, args.dev_windows, None)
    out = {"model": "smollm2-135m",
           "eval": f"held-out split, {args.windows} windows x {SEQ_LEN} tokens; dev split {dev.shape[0]} windows x "
                   f"{SEQ_LEN} from every {DEV_EVERY}th calibration article",
           "calib": f"{CALIB_SAMPLES} x {SEQ_LEN} tokens (seed {SEED}) from the other calibration articles",
           "environment": environment(argv), "rows": [], "chosen": {}}

    def add(row: dict) -> dict:
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        write(out)
        return row

    add(bf16_row(args.windows, dev))
    blocks = [int(b) for b in args.blocks.split(",")]
    schemes = args.schemes.split(",")
    # cheapest and most informative rows first (the shared machine may not finish the run)
    for scheme in schemes:
        add(run_config(scheme, "rtn", 0, args.windows, dev, calib))
        online = [add(run_config(scheme, f"online{b}", b, args.windows, dev, calib)) for b in blocks]
        out["chosen"][scheme] = min(online, key=lambda r: r["dev_ppl"])["block"]  # chosen on dev only
    for scheme in schemes:
        add(run_config(scheme, "fused64", 64, args.windows, dev, calib))
    if not args.no_gptq:
        for scheme in schemes:
            best = out["chosen"][scheme]
            add(run_config(scheme, f"online{best}+gptq", best, args.windows, dev, calib))
        for scheme in schemes:
            add(run_config(scheme, "gptq", 0, args.windows, dev, calib))
    return out


if __name__ == "__main__":
    main()
