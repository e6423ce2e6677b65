"""End-to-end check of the llm-compressor peer: quantize every scheme, load it back, score it.

Runs in the MAIN venv from the repo root (it uses quantkit for the model, calibration and
perplexity, and drives the peer through bench.peers.common):

    .venv/bin/python -m bench.peers.verify_peer [--schemes W8A8 NVFP4] [--max-windows 16] [--gptq]

Writes bench/work/peer_verify.json and .md (bench/work is git-ignored).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.peers.common import BENCH_DIR, ensure_peer, peer_versions, run_peer, write_calib
from bench.peers.eval_checkpoint import evaluate
from bench.peers.run_llmcompressor import SCHEMES

WORK = BENCH_DIR / "work"


def calib_file(model_dir: Path, n_samples: int, seq_len: int) -> Path:
    from transformers import AutoTokenizer

    from quantkit.calib import load_calib

    ids = load_calib(AutoTokenizer.from_pretrained(model_dir), n_samples=n_samples, seq_len=seq_len, seed=0)
    return write_calib(ids, WORK / f"calib_{n_samples}x{seq_len}.npy")


def markdown(rows: list[dict], base: dict, versions: dict) -> str:
    lines = [
        "# llm-compressor peer: end-to-end check",
        "",
        f"Peer: {', '.join(f'{k} {v}' for k, v in versions.items())}. "
        f"Perplexity: quantkit.eval.perplexity, {base['max_windows']} windows x {base['seq_len']} tokens "
        "of calib_data/wiki_eval.jsonl, checkpoints loaded with plain AutoModelForCausalLM in quantkit's venv.",
        "",
        "| scheme | method | format | ppl | ppl / bf16 | apply s | oneshot s | peak RSS MB | checkpoint MB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| bf16 | - | dense | {base['perplexity']:.2f} | 1.000 | - | - | - | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r['scheme']} | {r['method']} | {r['format']} | {r['perplexity']:.2f} | "
            f"{r['perplexity'] / base['perplexity']:.3f} | {r['time_apply_s']:.1f} | {r['time_oneshot_s']:.1f} | "
            f"{r['outside']['peak_rss_mb']:.0f} | {r['checkpoint_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--gptq", action="store_true")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--skip-baseline", action="store_true")
    args = p.parse_args(argv)

    from quantkit.models import default_model_dir

    install_s = ensure_peer()
    model_dir = default_model_dir()
    calib = calib_file(model_dir, args.n_samples, args.seq_len)
    method = "gptq" if args.gptq else "rtn"
    base = {"perplexity": float("nan"), "max_windows": args.max_windows, "seq_len": args.seq_len}
    if not args.skip_baseline:
        base = evaluate(str(model_dir), seq_len=args.seq_len, max_windows=args.max_windows)
        print(f"bf16 ppl {base['perplexity']:.3f}", flush=True)
    rows = []
    for scheme in args.schemes:
        out = WORK / f"llmc-{method}-{scheme}"
        peer = run_peer(scheme, model_dir, calib, out, gptq=args.gptq, overwrite=True, log_file=WORK / f"{out.name}.log")
        ev = evaluate(str(out), seq_len=args.seq_len, max_windows=args.max_windows)
        row = {**peer, "perplexity": ev["perplexity"], "eval": ev}
        print(f"{scheme} {method} ppl {ev['perplexity']:.3f} apply {peer['time_apply_s']:.1f}s "
              f"oneshot {peer['time_oneshot_s']:.1f}s rss {peer['outside']['peak_rss_mb']:.0f}MB", flush=True)
        rows.append(row)
    versions = peer_versions()
    out = {"install_s": install_s, "versions": versions, "baseline": base, "rows": rows}
    stem = WORK / f"peer_verify_{method}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, base, versions))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
