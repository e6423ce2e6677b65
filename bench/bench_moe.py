"""A 1B-shaped random Mixtral (8 experts): `apply nvfp4-w4a16` wall time and peak RSS, quantkit vs llm-compressor.

The model is written deterministically here (bench/synth.py's seeded pool, name-offset windows),
in the original Mixtral checkpoint layout (`block_sparse_moe.experts.{e}.w1/w2/w3`, which
transformers 5 fuses into 3-D expert parameters on load), bf16, SmolLM2's vocabulary and
tokenizer. Shape (~0.94B parameters, 0.84B of them in experts):

    hidden 1024, 16 layers, 16 heads / 4 kv heads, 8 experts of intermediate 2048, top-2

One run, each tool as its own process under GNU time (peak RSS of the process, wall from
process start to exit, imports included), evaluation off. llm-compressor runs its calibration
forwards on 4 x 256 seeded token ids; quantkit's nvfp4-w4a16 recipe needs no calibration forward
(weight-only, `collect_stats: false`), so it runs none:
  1. quantkit apply recipes/nvfp4-w4a16.yaml --execution whole
  2. quantkit apply recipes/nvfp4-w4a16.yaml --execution streaming
  3. llm-compressor oneshot NVFP4A16 (bench/peers/run_llmcompressor.py)
Results: bench/results/moe.json and moe.md (rewritten after every row).

    nice -n 10 .venv/bin/python -m bench.bench_moe [--skip-peer]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_streaming import gnu_time  # noqa: E402  (one GNU-time runner for every bench)
from bench.provenance import provenance, provenance_markdown  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work"
NAME = "moe"
N_SAMPLES, SEQ_LEN = 4, 256
PEER_TIMEOUT_S = 60 * 60
DIMS = dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)


def write_moe(out: Path) -> Path:
    """The 1B-shaped Mixtral checkpoint; peak memory is one tensor (reuses an existing one)."""
    from transformers import MixtralConfig

    from bench.synth import VOCAB, attention_tensors, write_synthetic

    if (out / "config.json").exists():
        return out
    config = MixtralConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
                           dtype="bfloat16", **DIMS)
    h, i, n, e = DIMS["hidden_size"], DIMS["intermediate_size"], DIMS["num_hidden_layers"], DIMS["num_local_experts"]
    kv = h // DIMS["num_attention_heads"] * DIMS["num_key_value_heads"]
    blocks: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(n):
        p = f"model.layers.{layer}."
        blocks += attention_tensors(p, h, kv) + [(p + "block_sparse_moe.gate.weight", (e, h))]
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            blocks += [(q + "w1.weight", (i, h)), (q + "w3.weight", (i, h)), (q + "w2.weight", (h, i))]
    write_synthetic(out, config, blocks, {"shape": "mixtral-1b-8e", "dims": DIMS, "vocab": VOCAB, "parameters": None,
                                          "weights": "bench/synth.py pool windows at sha256(name) offsets"})
    return out


def quantkit_apply(model_dir: Path, out: Path, execution: str, tag: str) -> dict:
    cmd = [str(Path(sys.executable).parent / "quantkit"), "apply", "recipes/nvfp4-w4a16.yaml", str(model_dir),
           "-o", str(out), "--force", "--no-eval", "--execution", execution,
           "--set", f"calib.n_samples={N_SAMPLES}", "--set", f"calib.seq_len={SEQ_LEN}", "--set", "calib.batch_size=4"]
    r = gnu_time(cmd, tag)
    r.update(_cpu(WORK / f"{tag}.time.txt"))
    r["command"] = " ".join(["quantkit", *cmd[1:]])
    if "error" not in r:
        r["checkpoint_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        r["experts_written"] = _expert_modules(out)
    return r


def _cpu(time_file: Path) -> dict:
    """User + system CPU seconds of a process from its GNU time file: on a loaded shared machine
    wall time mostly measures the load, CPU time the work."""
    from bench.peers.common import parse_gnu_time

    cpu = parse_gnu_time(time_file.read_text()).get("cpu_s") if time_file.exists() else None
    return {} if cpu is None else {"cpu_s": round(cpu, 1)}


def _expert_modules(path: Path) -> int:
    """Per-expert quantized weights in a checkpoint (one `weight_packed` per expert matrix)."""
    from quantkit.inspect import _header

    return sum(1 for f in path.glob("*.safetensors") for k in _header(f)
               if ".experts." in k and k.endswith(".weight_packed"))


def peer_apply(model_dir: Path, calib: Path, out: Path) -> dict:
    from bench.peers.common import PeerError, ensure_peer, run_peer

    try:
        ensure_peer()
        res = run_peer("NVFP4A16", model_dir, calib, out, overwrite=True, timeout=PEER_TIMEOUT_S,
                       log_file=WORK / "moe-llmc.log")
    except (PeerError, OSError, TimeoutError) as exc:
        return {"error": str(exc).splitlines()[0][:300]}
    outside = res.get("outside", {})
    r = {"wall_s": round(outside.get("wall_s", 0.0), 1), "peak_rss_mb": round(outside.get("peak_rss_mb", 0)),
         **_cpu(WORK / "moe-llmc.time.txt"),
         "time_apply_s": res.get("time_apply_s"), "time_import_s": res.get("time_import_s"),
         "command": "bench/.venv-llmc/bin/python bench/peers/run_llmcompressor.py --scheme NVFP4A16 "
                    f"--model {model_dir} --calib {calib} --out {out}"}
    r["checkpoint_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    r["experts_written"] = _expert_modules(out)
    return r


def markdown(res: dict) -> str:
    lines = ["# MoE: 1B-shaped random Mixtral (8 experts), apply nvfp4-w4a16, quantkit vs llm-compressor", "",
             *provenance_markdown(res["provenance"], res.get("loadavg_end", (0, 0, 0))),
             f"Model: {json.dumps(DIMS)}, vocab 49152, {res.get('parameters', 0) / 1e9:.2f} B parameters, bf16, "
             f"random (bench/bench_moe.py). llm-compressor calibrates on {N_SAMPLES} x {SEQ_LEN} token ids; quantkit's "
             "weight-only recipe runs no calibration forward. Evaluation off. "
             "Wall is process start to exit (imports included); peak RSS and CPU seconds from GNU time. The run "
             "shares 2 cores with other engineers' work under `nice -n 10` (load averages above): wall time mostly "
             "measures that load, CPU seconds the work.", "",
             "| tool | wall s | CPU s (user+sys) | peak RSS MB | checkpoint MB | per-expert weights written | "
             "wall vs llm-compressor | CPU vs llm-compressor | RSS vs llm-compressor |",
             "|---|---|---|---|---|---|---|---|---|"]
    peer = res["rows"].get("llm-compressor", {})
    for tool, r in res["rows"].items():
        if "error" in r:
            lines.append(f"| {tool} | error: {r['error']} | | | | | | | |")
            continue

        def ratio(key: str, r=r) -> str:
            return f"{r[key] / peer[key]:.2f}x" if peer.get(key) and r.get(key) else "n/a"

        lines.append(f"| {tool} | {r['wall_s']} | {r.get('cpu_s', 'n/a')} | {r['peak_rss_mb']} | "
                     f"{r.get('checkpoint_bytes', 0) / 1e6:.0f} | {r.get('experts_written')} | {ratio('wall_s')} | "
                     f"{ratio('cpu_s')} | {ratio('peak_rss_mb')} |")
    lines += ["", "Commands:", ""] + [f"- {tool}: `{r.get('command', '')}`" for tool, r in res["rows"].items()]
    return "\n".join(lines) + "\n"


def save(res: dict) -> None:
    res["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(res))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--cpu-from-logs", action="store_true",
                   help="add CPU seconds to the rows of the last run from its GNU time files (bench/work), rewrite the tables")
    args = p.parse_args(argv)
    if args.cpu_from_logs:
        return _cpu_from_logs()
    from bench.peers.common import write_calib

    WORK.mkdir(parents=True, exist_ok=True)
    res = {"provenance": provenance("bench/bench_moe.py", argv or []), "rows": {}}
    model_dir = write_moe(WORK / "mixtral-1b-8e")
    res["parameters"] = json.loads((model_dir / "SYNTHETIC.json").read_text())["parameters"]
    ids = torch.randint(0, 49152, (N_SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    calib = write_calib(ids, WORK / "moe-calib.npy")
    for execution in ("whole", "streaming"):
        res["rows"][f"quantkit ({execution})"] = quantkit_apply(model_dir, WORK / f"moe-qk-{execution}", execution,
                                                               f"moe-qk-{execution}")
        save(res)
        print(json.dumps(res["rows"]), flush=True)
    if not args.skip_peer:
        res["rows"]["llm-compressor"] = peer_apply(model_dir, calib, WORK / "moe-llmc")
        save(res)
    print(json.dumps(res["rows"]), flush=True)
    return res


def _cpu_from_logs() -> dict:
    """For a run made before rows recorded CPU time: the same run's GNU time files hold it."""
    res = json.loads((RESULTS / f"{NAME}.json").read_text())
    files = {"quantkit (whole)": "moe-qk-whole", "quantkit (streaming)": "moe-qk-streaming", "llm-compressor": "moe-llmc"}
    for tool, r in res["rows"].items():
        r.update(_cpu(WORK / f"{files[tool]}.time.txt"))
    loadavg_end = res.get("loadavg_end")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(res) if loadavg_end else markdown({**res, "loadavg_end": (0, 0, 0)}))
    return res


if __name__ == "__main__":
    main()
