"""Load checkpoints in quantkit's environment with plain transformers and measure perplexity.

Runs in the MAIN venv (newer transformers + compressed-tensors): it proves that what the peer
wrote loads where users load it, and scores it on the same held-out text as quantkit's own
output. compressed-tensors decompresses the weights on the first forward and keeps simulating
the activation quantization (dynamic per-token int8, per-16/32 FP4 blocks) in every Linear.

    .venv/bin/python bench/peers/eval_checkpoint.py DIR [DIR ...] --json results.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path


def evaluate(path: str, *, seq_len: int, max_windows: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.eval import perplexity

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    t1 = time.perf_counter()
    ppl = perplexity(model, tokenizer, seq_len=seq_len, max_windows=max_windows)
    t2 = time.perf_counter()
    qcfg = getattr(model.config, "quantization_config", None)
    qcfg = qcfg.to_dict() if hasattr(qcfg, "to_dict") else qcfg
    return {
        "path": path,
        "format": (qcfg or {}).get("format", "dense"),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "perplexity": ppl,
        "seq_len": seq_len,
        "max_windows": max_windows,
        "time_load_s": t1 - t0,
        "time_eval_s": t2 - t1,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="HF model directories")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=64, help="0: the whole eval text")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    for path in args.paths:
        row = evaluate(path, seq_len=args.seq_len, max_windows=args.max_windows or None)
        print(f"{row['perplexity']:8.3f}  {row['format']:<22} {path}  "
              f"(load {row['time_load_s']:.1f} s, eval {row['time_eval_s']:.1f} s)", flush=True)
        rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
