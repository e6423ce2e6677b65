"""Streaming execution: peak RSS and wall time on models bigger than comfortable, against llm-compressor.

One run, in this order (results are rewritten after every row, so a long run leaves partial
results if interrupted):
  1. SmolLM2-135M, nvfp4-w4a16: whole vs streaming (wall, peak RSS), evaluation off.
  2. Memory vs size: nvfp4-w4a16 streaming on SmolLM2-135M, a 1B-shaped and a 7B-shaped Llama.
  3. 7B-shaped Llama (Llama-2-7B dims, SmolLM2's vocab, random bf16, ~14 GB of shards written
     by bench/synth.py): int8-w8a8, nvfp4-w4a16, nvfp4-w4a4 with quantkit streaming and with
     llm-compressor oneshot, calibration 4 x 256 tokens (identical ids), evaluation off.
  4. The 7B outputs load in transformers; for NVFP4A16 the logits of a short prompt are finite
     and match quantkit's real-quant runtime.
Every tool runs as its own process under GNU time (peak RSS of the process).

    .venv/bin/python bench/bench_streaming.py [--skip-peer] [--only smollm2,sizes,7b,load]
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

from bench.provenance import provenance, provenance_markdown  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"
NAME = "streaming"
SCHEMES = {"W8A8": "int8-w8a8", "NVFP4A16": "nvfp4-w4a16", "NVFP4": "nvfp4-w4a4"}
N_SAMPLES, SEQ_LEN = 4, 256
PEER_TIMEOUT_S = 45 * 60


def gnu_time(cmd: list[str], tag: str, timeout: float | None = None) -> dict:
    time_file = WORK / f"{tag}.time.txt"
    start = time.perf_counter()
    try:
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(time_file), *cmd], capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    text = time_file.read_text() if time_file.exists() else ""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    out = {"wall_s": round(wall, 1), "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
           "exit": proc.returncode}
    if proc.returncode != 0:
        killed = "Killed" in proc.stderr or proc.returncode in (-9, 137)
        out["error"] = "out of memory (killed)" if killed else (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    (WORK / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    return out


def quantkit_apply(recipe: str, model_dir: Path, out: Path, execution: str, tag: str) -> dict:
    cmd = [str(Path(sys.executable).parent / "quantkit"), "apply", recipe, str(model_dir), "-o", str(out), "--force",
           "--no-eval", "--execution", execution, "--set", f"calib.n_samples={N_SAMPLES}",
           "--set", f"calib.seq_len={SEQ_LEN}", "--set", "calib.batch_size=4"]
    r = gnu_time(cmd, tag)
    r["command"] = " ".join(["quantkit", *cmd[1:]])
    if "error" not in r:
        r["checkpoint_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return r


LOAD_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
path, compare = sys.argv[1], sys.argv[2] == "1"
ids = torch.tensor([[1, 422, 2215, 253, 3012, 28, 1848, 7521, 314, 5046, 30]])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
with torch.no_grad():
    ref = model(input_ids=ids).logits.float()
out = {"finite": bool(torch.isfinite(ref).all())}
del model
if compare:
    from quantkit.export.ct_reader import load_ct_checkpoint
    qk = load_ct_checkpoint(path, torch.bfloat16).eval()
    with torch.no_grad():
        got = qk(input_ids=ids).logits.float()
    out["max_abs_diff"] = float((got - ref).abs().max())
    out["ref_abs_max"] = float(ref.abs().max())
    out["top1_agree"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
print("RESULT " + json.dumps(out))
"""


def load_check(path: Path, compare: bool, tag: str) -> dict:
    r = gnu_time([sys.executable, "-c", LOAD_CHECK, str(path), "1" if compare else "0"], tag)
    log = (WORK / f"{tag}.log").read_text()
    m = re.search(r"RESULT (\{.*\})", log)
    if m:
        r.update(json.loads(m.group(1)))
    return r


def save(res: dict) -> None:
    res["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(res))


def _cell(r: dict | None, key: str, fmt: str = "{}") -> str:
    if not r:
        return "-"
    if r.get("error"):
        return f"error: {r['error']}"
    v = r.get(key)
    return "-" if v is None else fmt.format(v)


def markdown(res: dict) -> str:
    out = ["# Streaming execution: memory and time (CPU, one run)", ""]
    out += provenance_markdown(res["provenance"], res["loadavg_end"])
    out += [f"Calibration {N_SAMPLES} x {SEQ_LEN} tokens, evaluation off. Peak RSS of the whole process under "
            "GNU time; wall time includes imports and writing the checkpoint.", ""]
    if res.get("smollm2"):
        out += ["## SmolLM2-135M, nvfp4-w4a16: whole vs streaming", "",
                "| execution | wall s | peak RSS MB |", "|---|---|---|"]
        for mode, r in res["smollm2"].items():
            out.append(f"| {mode} | {_cell(r, 'wall_s')} | {_cell(r, 'peak_rss_mb')} |")
        out.append("")
    if res.get("sizes"):
        out += ["## Peak RSS vs model size (nvfp4-w4a16, streaming)", "",
                "| model | checkpoint GB | wall s | peak RSS MB |", "|---|---|---|---|"]
        for name, r in res["sizes"].items():
            out.append(f"| {name} | {r.get('source_gb', '-')} | {_cell(r, 'wall_s')} | {_cell(r, 'peak_rss_mb')} |")
        out.append("")
    if res.get("llama7b"):
        peer_note = " (llm-compressor not run: --skip-peer)" if res.get("peer_skipped") else ""
        out += [f"## 7B-shaped Llama: quantkit streaming vs llm-compressor{peer_note}", "",
                "| scheme | quantkit wall s | quantkit peak RSS MB | llm-compressor wall s | llm-compressor peak RSS MB | quantkit checkpoint GB |",
                "|---|---|---|---|---|---|"]
        for scheme, row in res["llama7b"].items():
            q, p = row.get("quantkit"), row.get("llmcompressor")
            gb = f"{q['checkpoint_bytes'] / 1e9:.2f}" if q and q.get("checkpoint_bytes") else "-"
            out.append(f"| {scheme} | {_cell(q, 'wall_s')} | {_cell(q, 'peak_rss_mb')} | {_cell(p, 'wall_s')} | "
                       f"{_cell(p, 'peak_rss_mb')} | {gb} |")
        out.append("")
    if res.get("load"):
        out += ["## The 7B checkpoints load in transformers", "",
                "| scheme | loads | finite logits | max abs diff vs quantkit runtime | top-1 agreement | peak RSS MB |",
                "|---|---|---|---|---|---|"]
        for scheme, r in res["load"].items():
            out.append(f"| {scheme} | {'no: ' + r['error'] if r.get('error') else 'yes'} | {r.get('finite', '-')} | "
                       f"{r.get('max_abs_diff', '-')} | {r.get('top1_agree', '-')} | {r.get('peak_rss_mb', '-')} |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--only", default="smollm2,sizes,7b,load")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))

    from bench.synth import write_llama
    from quantkit.models import default_model_dir

    WORK.mkdir(parents=True, exist_ok=True)
    res: dict = {"provenance": provenance("bench/bench_streaming.py", argv), "peer_skipped": args.skip_peer}
    smollm2 = default_model_dir()
    llama7b = write_llama("llama-7b", WORK / "synth-llama-7b") if parts & {"sizes", "7b", "load"} else None
    if "7b" in parts:
        from bench.peers.common import PeerError, ensure_peer, run_peer, write_calib
        from transformers import AutoTokenizer

        from quantkit.calib import load_calib

        tok = AutoTokenizer.from_pretrained(llama7b)
        calib_file = write_calib(load_calib(tok, n_samples=N_SAMPLES, seq_len=SEQ_LEN, seed=0),
                                 WORK / f"calib_{N_SAMPLES}x{SEQ_LEN}.npy")
        res["llama7b"] = {}
        for scheme, recipe in SCHEMES.items():
            row = res["llama7b"][scheme] = {}
            row["quantkit"] = quantkit_apply(recipe, llama7b, WORK / f"qk7b-{scheme}", "streaming", f"qk7b-{scheme}")
            save(res)
            if args.skip_peer:
                continue
            try:
                ensure_peer()
                peer = run_peer(scheme, llama7b, calib_file, WORK / f"llmc7b-{scheme}", overwrite=True,
                                timeout=PEER_TIMEOUT_S, log_file=WORK / f"llmc7b-{scheme}.log")
                row["llmcompressor"] = {"wall_s": round(peer["outside"]["wall_s"], 1),
                                        "peak_rss_mb": round(peer["outside"].get("peak_rss_mb") or 0)}
            except subprocess.TimeoutExpired:
                row["llmcompressor"] = {"error": f"timed out after {PEER_TIMEOUT_S} s"}
            except PeerError as e:
                text = str(e)
                oom = "Killed" in text or "exit -9" in text or "exit 137" in text
                row["llmcompressor"] = {"error": "out of memory (killed)" if oom else text.splitlines()[0][:300]}
            save(res)
    if "load" in parts:
        res["load"] = {}
        for scheme in ("NVFP4A16", "W8A8", "NVFP4"):
            path = WORK / f"qk7b-{scheme}"
            if (path / "config.json").exists():
                res["load"][scheme] = load_check(path, scheme == "NVFP4A16", f"load7b-{scheme}")
                save(res)
    if "sizes" in parts:
        res["sizes"] = {}
        for name, path in (("SmolLM2-135M", smollm2), ("1B-shaped Llama", write_llama("llama-1b", WORK / "synth-llama-1b")),
                           ("7B-shaped Llama", llama7b)):
            reuse = res.get("llama7b", {}).get("NVFP4A16", {}).get("quantkit") if path == llama7b else None
            r = dict(reuse) if reuse else quantkit_apply("nvfp4-w4a16", path, WORK / f"stream-size-{path.name}",
                                                         "streaming", f"stream-size-{path.name}")
            r["source_gb"] = round(sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 1e9, 2)
            res["sizes"][name] = r
            save(res)
    if "smollm2" in parts:
        res["smollm2"] = {}
        for mode in ("whole", "streaming"):
            res["smollm2"][mode] = quantkit_apply("nvfp4-w4a16", smollm2, WORK / f"stream-smollm2-{mode}", mode,
                                                  f"stream-smollm2-{mode}")
            save(res)
    save(res)
    return res


if __name__ == "__main__":
    main()
