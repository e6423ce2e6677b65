"""Quantize a model with llm-compressor, the benchmark peer; runs inside bench/.venv-llmc.

Must not import quantkit: llm-compressor pins an older transformers / compressed-tensors than
quantkit needs, so the two live in separate environments and meet only through files:
the model directory (bf16 safetensors), the calibration token ids and the JSON written here.

    bench/.venv-llmc/bin/python bench/peers/run_llmcompressor.py \
        --model DIR --scheme NVFP4 --calib calib.npy --out bench/work/llmc-nvfp4 --json r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

# llm-compressor preset names (compressed_tensors.quantization.quant_scheme.PRESET_SCHEMES)
# that the quantkit benchmarks compare against.
SCHEMES = ("W8A8", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4")
# Calibration samples are fixed-length windows; one per batch as llm-compressor recommends,
# so its truncating collator never cuts a window.
CALIB_BATCH_SIZE = 1


def load_token_ids(path: Path):
    """Calibration token ids [N, seq] from .npy, .pt/.safetensors or .json -> LongTensor."""
    import torch

    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        ids = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".pt":
        ids = torch.load(path, weights_only=True)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        ids = load_file(path)["input_ids"]
    elif suffix == ".json":
        data = json.loads(path.read_text())
        ids = torch.tensor(data["input_ids"] if isinstance(data, dict) else data)
    else:
        sys.exit(f"--calib {path}: expected .npy, .pt, .safetensors or .json")
    if ids.ndim != 2:
        sys.exit(f"--calib {path}: expected token ids of shape [N, seq], got {tuple(ids.shape)}")
    return ids.long()


def calib_dataset(ids):
    """LongTensor [N, seq] -> a tokenized datasets.Dataset, which oneshot uses as is."""
    from datasets import Dataset

    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def build_recipe(scheme: str, gptq: bool):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    modifier = GPTQModifier if gptq else QuantizationModifier
    # lm_head stays unquantized on both sides of the benchmark (quantkit's default too).
    return modifier(targets="Linear", scheme=scheme, ignore=["lm_head"])


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import, c_import = time.perf_counter(), time.process_time()

    ids = load_token_ids(args.calib)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load, c_load = time.perf_counter(), time.process_time()

    oneshot(
        model=model,
        processor=tokenizer,
        recipe=build_recipe(args.scheme, args.gptq),
        dataset=calib_dataset(ids),
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        batch_size=CALIB_BATCH_SIZE,
        # Every sample is used, in file order, so both tools see the same batches.
        shuffle_calibration_samples=False,
    )
    t_oneshot, c_oneshot = time.perf_counter(), time.process_time()

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    t_save, c_save = time.perf_counter(), time.process_time()

    qcfg = json.loads((args.out / "config.json").read_text()).get("quantization_config", {})
    return {
        "peer": "llm-compressor",
        "method": "gptq" if args.gptq else "rtn",
        "scheme": args.scheme,
        "model": str(args.model),
        "out": str(args.out),
        "calib_shape": list(ids.shape),
        "format": qcfg.get("format"),
        "quantization_config": qcfg,
        # seconds; "apply" is load + calibrate + quantize + save, without interpreter imports
        "time_import_s": t_import - t_start,
        "time_load_s": t_load - t_import,
        "time_oneshot_s": t_oneshot - t_load,
        "time_save_s": t_save - t_oneshot,
        "time_apply_s": t_save - t_import,
        # CPU seconds (all threads): steadier than wall time on a shared machine
        "cpu_oneshot_s": c_oneshot - c_load,
        "cpu_apply_s": c_save - c_import,
        "peak_rss_mb": peak_rss_mb(),
        "checkpoint_bytes": dir_bytes(args.out, "*.safetensors"),
        "out_dir_bytes": dir_bytes(args.out),
        "threads": torch.get_num_threads(),
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="HF model directory (bf16 safetensors)")
    p.add_argument("--scheme", choices=SCHEMES, required=True, help="llm-compressor preset scheme")
    p.add_argument("--calib", type=Path, required=True, help="token ids [N, seq]: .npy, .pt, .safetensors or .json")
    p.add_argument("--out", type=Path, required=True, help="directory for the compressed checkpoint")
    p.add_argument("--json", type=Path, default=None, help="where to write the measurements (default: stdout)")
    p.add_argument("--gptq", action="store_true", help="GPTQModifier instead of round-to-nearest QuantizationModifier")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"--out {args.out} exists and is not empty")
    result = run(args)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
