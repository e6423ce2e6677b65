"""quantkit `apply` vs llm-compressor `oneshot`, side by side in one run.

Same model (SmolLM2-135M bf16 safetensors, converted once from the shipped GGUF), same scheme,
same calibration token ids (16 x 512, seed 0) and the same held-out evaluation windows. Both
tools run as separate processes under GNU time so wall time and peak RSS are measured the same
way; both checkpoints are then loaded with plain transformers (+ compressed-tensors) and scored
by one perplexity function. quantkit runs with --no-eval, since oneshot does not evaluate.

    .venv/bin/python bench/bench_apply.py [--schemes W8A8,NVFP4A16] [--windows 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers.common import PeerError, ensure_peer, peer_versions, run_peer, write_calib  # noqa: E402
from bench.provenance import provenance, provenance_markdown  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"
RECIPES = {"W8A8": "int8-w8a8", "NVFP4A16": "nvfp4-w4a16", "NVFP4": "nvfp4-w4a4",
           "MXFP4A16": "mxfp4-w4a16", "MXFP4": "mxfp4-w4a4"}
N_SAMPLES, SEQ_LEN, SEED = 16, 512, 0


def gnu_time(cmd: list[str], time_file: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(time_file), *cmd], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    text = time_file.read_text()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_s": wall, "peak_rss_mb": rss / 1024}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def ppl_of_checkpoint(path: Path, windows: int, dtype: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.eval import perplexity

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return perplexity(model, tok, max_windows=windows)


def carried_rows(new: list[dict], schemes: list[str]) -> list[dict]:
    """Rows of the previous results file for schemes this invocation did not run, each keeping
    where it was measured (a file from before rows recorded that gets the commit that committed it)."""
    old_file = RESULTS / "apply.json"
    if not old_file.exists():
        return []
    old = json.loads(old_file.read_text())
    committed = subprocess.run(["git", "log", "-1", "--format=%H", "--", str(old_file)], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
    out = []
    for r in old.get("rows", []):
        if r["scheme"] in schemes or "error" in r:
            continue
        r.setdefault("bf16_ppl", old.get("bf16_ppl"))
        r.setdefault("eval", old.get("eval", "?").split(" tokens")[0].replace(" windows x", " x") + ", bfloat16")
        r.setdefault("measured_in", {"commit": committed, "command": "(not recorded)"})
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default=",".join(RECIPES))
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows of 512 tokens")
    # fp32 evaluation is several times cheaper than bf16 on AVX2 CPUs; both checkpoints are scored the same way
    ap.add_argument("--eval-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    prov = provenance("bench/bench_apply.py", argv)

    from transformers import AutoTokenizer

    from quantkit.calib import load_calib
    from quantkit.models import default_model_dir

    ensure_peer()
    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = load_calib(tok, n_samples=N_SAMPLES, seq_len=SEQ_LEN, seed=SEED)
    calib_file = write_calib(ids, WORK / f"calib_{N_SAMPLES}x{SEQ_LEN}.npy")
    rows = []
    baseline = ppl_of_checkpoint(model_dir, args.windows, args.eval_dtype)
    quantkit_cmd = [str(Path(sys.executable).parent / "quantkit")]
    for scheme in args.schemes.split(","):
        recipe = RECIPES[scheme]
        qk_out = WORK / f"qk-{scheme}"
        qk = gnu_time([*quantkit_cmd, "apply", recipe, str(model_dir), "-o", str(qk_out), "--force", "--no-eval",
                       "--set", f"calib.n_samples={N_SAMPLES}", "--set", f"calib.seq_len={SEQ_LEN}"],
                      WORK / f"qk-{scheme}.time.txt")
        try:
            peer = run_peer(scheme, model_dir, calib_file, WORK / f"llmc-{scheme}", overwrite=True)
        except PeerError as e:
            rows.append({"scheme": scheme, "error": str(e).splitlines()[0]})
            continue
        p_out = Path(peer.get("out") or WORK / f"llmc-{scheme}")
        import torch

        from quantkit.export.ct_reader import load_ct_checkpoint
        from quantkit.eval import perplexity

        peer_in_qk_runtime = perplexity(load_ct_checkpoint(p_out, getattr(torch, args.eval_dtype)), tok, max_windows=args.windows)
        row = {
            "scheme": scheme, "eval": f"{args.windows} x 512, {args.eval_dtype}", "bf16_ppl": baseline,
            "measured_in": {"commit": prov["commit"], "command": prov["command"]},
            "quantkit": {**qk, "checkpoint_bytes": dir_bytes(qk_out), "ppl": ppl_of_checkpoint(qk_out, args.windows, args.eval_dtype)},
            "llmcompressor": {"wall_s": peer["outside"]["wall_s"], "peak_rss_mb": peer["outside"].get("peak_rss_mb"),
                              "checkpoint_bytes": dir_bytes(p_out), "ppl": ppl_of_checkpoint(p_out, args.windows, args.eval_dtype),
                              "ppl_in_quantkit_runtime": peer_in_qk_runtime},
        }
        q, p = row["quantkit"], row["llmcompressor"]
        row["ratios"] = {
            "wall": q["wall_s"] / p["wall_s"],
            "peak_rss": q["peak_rss_mb"] / p["peak_rss_mb"] if p["peak_rss_mb"] else None,
            "ppl": q["ppl"] / p["ppl"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows = carried_rows(rows, args.schemes.split(",")) + rows
    rows.sort(key=lambda r: list(RECIPES).index(r["scheme"]))
    result = {"provenance": prov, "loadavg_end": os.getloadavg(),
              "model": "SmolLM2-135M-Instruct (bf16 from GGUF Q4_1)", "bf16_ppl": baseline,
              "eval": f"{args.windows} windows x 512 tokens, held-out Wikipedia split (calib_data/wiki_eval.jsonl: whole articles disjoint from the calibration split wiki_calib.jsonl)",
              "calib": f"{N_SAMPLES} x {SEQ_LEN} tokens, seed {SEED}, identical ids for both tools",
              "peer_versions": peer_versions(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "apply.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# quantkit apply vs llm-compressor oneshot (SmolLM2-135M, CPU, one run)", "",
             *provenance_markdown(prov, result["loadavg_end"]),
             "Wall time and peak RSS of the whole process (imports included) under GNU time. "
             "`llmc ppl (qk rt)`: llm-compressor's checkpoint read into quantkit's real-quant runtime.", "",
             f"This invocation: bf16 perplexity {baseline:.3f} ({result['eval']}, scored in {args.eval_dtype}); "
             f"calibration: {result['calib']}.", "",
             "Rows not re-measured in this invocation are carried from the previous results file; the last two "
             "columns say where each row comes from and how it was scored (compare perplexities within a row, or "
             "between rows with the same eval column).", "",
             "| scheme | qk wall s | llmc wall s | wall ratio | qk RSS MB | llmc RSS MB | RSS ratio | qk ppl | llmc ppl | ppl ratio | llmc ppl (qk rt) | qk bytes | llmc bytes | bf16 ppl | eval | measured at |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scheme']} | error: {r['error']} |")
            continue
        q, p, x = r["quantkit"], r["llmcompressor"], r["ratios"]
        lines.append(f"| {r['scheme']} | {q['wall_s']:.1f} | {p['wall_s']:.1f} | {x['wall']:.2f} | {q['peak_rss_mb']:.0f} | "
                     f"{p['peak_rss_mb']:.0f} | {x['peak_rss']:.2f} | {q['ppl']:.3f} | {p['ppl']:.3f} | {x['ppl']:.4f} | "
                     f"{p['ppl_in_quantkit_runtime']:.3f} | "
                     f"{q['checkpoint_bytes']:,} | {p['checkpoint_bytes']:,} | {r['bf16_ppl']:.3f} | {r['eval']} | "
                     f"`{r['measured_in']['commit'][:8]}` |")
    (RESULTS / "apply.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
