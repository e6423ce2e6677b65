"""Quantize-and-pack (and unpack-dequantize) throughput of NVFP4/MXFP4 on a 4096x4096 bf16 matrix.

Peers, measured in the same run on the same tensor: compressed-tensors' reference path (what
llm-compressor runs on CPU: observer amax, generate_gparam, calculate_qparams, then the
compressor's compress / decompress) and torchao's nvfp4_quantize / to_mx when torchao imports.
Throughput is bf16 input bytes per CPU second (GB/s = 1e9 B/s); best of ``--repeats`` runs, on
``--threads`` intra-op threads (1 by default). CPU time of the calling thread, not wall time: on a
machine shared with other jobs wall time measures the scheduler (a wall-time run at load average 28
had NVFP4 dequantize 8x slower than MXFP4's, whose CPU times are equal).

    python bench/bench_formats.py [--size 4096] [--repeats 3] [--threads 1]
writes bench/results/formats.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.provenance import provenance, provenance_markdown  # noqa: E402
from quantkit.formats import get_format  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best CPU seconds of this thread over repeats (with one thread, all of the op's work)."""
    fn()  # warm-up: first-call allocations, LUT caches
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def _ct_ops(w: torch.Tensor) -> dict[str, Callable[[], object]]:
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    nv, mx = preset_name_to_scheme("NVFP4A16", ["Linear"]), preset_name_to_scheme("MXFP4A16", ["Linear"])

    def nvfp4():
        gs = generate_gparam(w.amin(), w.amax())
        wg = w.unflatten(-1, (-1, 16))
        s, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), nv.weights, global_scale=gs)
        return NVFP4PackedCompressor.compress({"weight": w, "weight_scale": s, "weight_global_scale": gs,
                                               "weight_zero_point": zp}, nv)

    def mxfp4():
        wg = w.unflatten(-1, (-1, 32))
        s, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), mx.weights)
        return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": s, "weight_zero_point": zp}, mx)

    nv_sd, mx_sd = nvfp4(), mxfp4()
    return {
        "nvfp4/quantize": nvfp4,
        "mxfp4/quantize": mxfp4,
        "nvfp4/dequantize": lambda: NVFP4PackedCompressor.decompress(dict(nv_sd), nv),
        "mxfp4/dequantize": lambda: MXFP4PackedCompressor.decompress(dict(mx_sd), mx),
    }


def _torchao_ops(w: torch.Tensor) -> dict[str, Callable[[], object]]:
    try:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import to_mx
        from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale
    except Exception:  # noqa: BLE001 - torchao is optional
        return {}

    def nvfp4():
        return nvfp4_quantize(w, 16, per_tensor_amax_to_scale(w.abs().amax().float()))

    return {
        "nvfp4/quantize": nvfp4,
        "mxfp4/quantize": lambda: to_mx(w, torch.float4_e2m1fn_x2, 32, scaling_mode=ScaleCalculationMode.EVEN),
    }


def _quantkit_ops(w: torch.Tensor) -> dict[str, Callable[[], object]]:
    nv, mx = get_format("nvfp4"), get_format("mxfp4_even")
    qn, qm = nv.quantize(w), mx.quantize(w)
    return {
        "nvfp4/quantize": lambda: nv.quantize(w),
        "mxfp4/quantize": lambda: mx.quantize(w),
        "nvfp4/dequantize": lambda: nv.dequantize(qn, torch.bfloat16),
        "mxfp4/dequantize": lambda: mx.dequantize(qm, torch.bfloat16),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU time is this thread's)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    prov = provenance("bench/bench_formats.py", argv)
    torch.set_num_threads(args.threads)
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    nbytes = w.numel() * w.element_size()
    peers = {"quantkit": _quantkit_ops(w), "compressed-tensors": _ct_ops(w), "torchao": _torchao_ops(w)}
    rows = []
    for op in sorted(peers["quantkit"]):
        ours = _best_time(peers["quantkit"][op], args.repeats)
        for peer, ops in peers.items():
            if op not in ops:
                continue
            t = ours if peer == "quantkit" else _best_time(ops[op], args.repeats)
            rows.append({"op": op, "impl": peer, "seconds": round(t, 4), "gb_per_s": round(nbytes / t / 1e9, 3),
                         "quantkit_speedup": round(t / ours, 2)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"provenance": prov, "loadavg_end": os.getloadavg(),
           "shape": [args.size, args.size], "dtype": "bfloat16", "device": "cpu",
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "load_average_1m": round(os.getloadavg()[0], 1), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "formats.json").write_text(json.dumps(out, indent=2))
    lines = [f"# FP4 quantize+pack / dequantize throughput, {args.size}x{args.size} bf16, CPU "
             f"({out['threads']} threads, best of {args.repeats}, load average {out['load_average_1m']})", "",
             *provenance_markdown(prov, out["loadavg_end"]),
             "| op | implementation | CPU seconds | GB/s (bf16 in, per CPU second) | quantkit speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['impl']} | {r['seconds']} | {r['gb_per_s']} | {r['quantkit_speedup']}x |" for r in rows]
    (RESULTS / "formats.md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
