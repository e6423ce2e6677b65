"""Real-mode runtime: quantkit's kernels against bf16/fp32 nn.Linear and the CPU peers, one run.

1. Layer micro-benchmarks: SmolLM2-135M and Llama-7B linear shapes at 1, 32 and 512 rows, bf16
   inputs, each quantkit scheme (real mode, the kernel QLinear picks) against nn.Linear in bf16 and
   fp32, bitsandbytes Linear8bitLt (threshold 0: pure int8), torchao's CPU int8 weight-only, int8
   dynamic-activation and int4 weight-only, and raw torch._int_mm on the codes (why W8A8 does not
   use it on this CPU). Calls are interleaved round by round; the number is the median CPU time
   per call on one intra-op thread (a shared machine inflates wall time, not the work done).
2. End to end: SmolLM2-135M perplexity on the held-out windows, real mode per scheme vs bf16,
   same process, same windows; eval CPU and wall seconds.
3. Memory: per scheme, in a fresh subprocess, the quantized model's tensor bytes (parameters,
   buffers, kernel caches) against its packed size, the shared tile scratch, and process RSS.

    python bench/bench_runtime.py [--threads 1] [--rounds 5] [--windows 8] [--skip-layers]
                                  [--skip-e2e] [--skip-memory] [--quick]
writes bench/results/runtime.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantkit.nn.kernels import tiled  # noqa: E402
from quantkit.nn.qlinear import QLinear, quantize_linear  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAME = "runtime"
# (model, layer, out, in)
SHAPES = [
    ("SmolLM2", "q/o_proj", 576, 576),
    ("SmolLM2", "k/v_proj", 192, 576),
    ("SmolLM2", "gate/up_proj", 1536, 576),
    ("SmolLM2", "down_proj", 576, 1536),
    ("Llama-7B", "q/k/v/o_proj", 4096, 4096),
    ("Llama-7B", "gate/up_proj", 11008, 4096),
    ("Llama-7B", "down_proj", 4096, 11008),
]
ROWS = (1, 32, 512)
# scheme label -> (weight format, activation format)
SCHEMES = {
    "W8A8 int8": ("int8", "int8"),
    "W8A16 int8": ("int8", None),
    "W4A16 int4 g32": ("int4", None),
    "W4A16 int4 g128": ("int4_g128", None),
    "W4A16 nvfp4": ("nvfp4", None),
    "W4A16 mxfp4": ("mxfp4", None),
}
# opt-in FP4 decode on torch's INT4 kernel (QUANTKIT_FP4_DECODE=int4x2; codes at 2x the packed size)
OPT_IN_INT4X2 = {"W4A16 nvfp4 int4x2 (opt-in)": "nvfp4", "W4A16 mxfp4 int4x2 (opt-in)": "mxfp4"}
W8A8_ONEDNN = "W8A8 onednn sign-split (probe)"
GOALS = {  # scheme -> (prefill 512 rows, decode 1 row): required bf16_time / scheme_time
    "W8A8 int8": (1.5, 1 / 1.2),
    "W8A16 int8": (1.0, 1.0),
    "W4A16 int4 g32": (1.0, 1.0),
    "W4A16 int4 g128": (1.0, 1.0),
    "W4A16 nvfp4": (1 / 1.3, 1 / 1.3),
    "W4A16 mxfp4": (1 / 1.3, 1 / 1.3),
    "W4A16 nvfp4 int4x2 (opt-in)": (1 / 1.3, 1 / 1.3),
    "W4A16 mxfp4 int4x2 (opt-in)": (1 / 1.3, 1 / 1.3),
    W8A8_ONEDNN: (1.5, 1 / 1.2),
}
SLOW_CALL_S = 3.0  # a competitor whose first call takes longer is timed in fewer rounds (noted)
MIN_MEASURE_S = 0.01  # repeat tiny calls within one measurement so timer noise stays small


# -- provenance ----------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def provenance(argv: list[str]) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "quantkit/nn", "bench/bench_runtime.py"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "commit": commit, "runtime_files_dirty": bool(dirty),
        "command": " ".join(["python", "bench/bench_runtime.py", *argv]),
        "versions": {p: _version(p) for p in ("torch", "transformers", "bitsandbytes", "torchao", "compressed-tensors")},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "vnni": bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)()),
                    "loadavg_start": os.getloadavg()},
    }


# -- competitors ---------------------------------------------------------------------------------
def _bnb(lin: nn.Linear) -> nn.Module:
    import logging

    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    mod = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=0.0)
    mod.load_state_dict({"weight": lin.weight.detach().float()})
    return mod.to("cpu").eval()  # .to() quantizes


def _torchao(lin: nn.Linear, kind: str) -> nn.Module:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    cfg = {"int8wo": Int8WeightOnlyConfig, "int8dyn": Int8DynamicActivationInt8WeightConfig,
           "int4wo": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="opaque")}[kind]()
    m = nn.Sequential(copy.deepcopy(lin))
    quantize_(m, cfg)
    return m


def _raw_int_mm(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The integer GEMM alone (what W8A8 would cost on torch._int_mm), int8 stand-in codes of x."""
    xq = (x * 40).clamp(-128, 127).to(torch.int8)
    if xq.shape[0] <= 16:  # _int_mm wants more than 16 rows
        xq = torch.nn.functional.pad(xq, (0, 0, 0, 17 - xq.shape[0]))
    return torch._int_mm(xq, codes.t())


def _int4x2(lin: nn.Linear, wf: str) -> QLinear:
    """A real-mode FP4 QLinear whose kernel was chosen with QUANTKIT_FP4_DECODE=int4x2 set."""
    from quantkit.nn.kernels.select import FP4_DECODE_ENV

    q = quantize_linear(lin, wf, mode="real")
    previous = os.environ.get(FP4_DECODE_ENV)
    os.environ[FP4_DECODE_ENV] = "int4x2"
    try:
        q.kernel_for(lin.weight.dtype)  # the choice is cached per (device, dtype) on first use
    finally:
        if previous is None:
            os.environ.pop(FP4_DECODE_ENV)
        else:
            os.environ[FP4_DECODE_ENV] = previous
    return q


def _w8a8_onednn(q: QLinear) -> Callable:
    """W8A8 with exact int32 accumulation on oneDNN's u8 x s8 GEMM (not a quantkit route; a probe).

    AVX2's u8 x s8 multiply-add saturates pair sums in int16 (a plain u8 with zero point 128 gave
    wrong sums), so the signed activation codes go in as two non-negative rows, max(x, 0) <= 127
    and max(-x, 0) <= 128, whose pair sums stay inside int16; acc = y_pos - y_neg. Same per-token
    quantization and fp32 epilogue as quantkit's W8A8. Holds a prepacked copy of the int8 weight.
    """
    from quantkit.nn.kernels import int8 as k_int8

    packed = torch.ops.onednn.qlinear_prepack(q.weight_codes, [2, q.in_features])
    ones, zeros = torch.ones(q.out_features), torch.zeros(q.out_features, dtype=torch.long)
    ws = k_int8.w8a8_scales(q.weight_scale, q.output_scale)

    def run(x: torch.Tensor) -> torch.Tensor:
        xq, xs = k_int8.act_codes(x, torch.int16)  # [T, in] exact integers in [-128, 127]
        two = torch.cat([xq.clamp(min=0), (-xq).clamp_(min=0)]).to(torch.uint8)  # [2T, in]
        y = torch.ops.onednn.qlinear_pointwise(two, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                               "none", [], "")
        t = x.shape[0]
        return k_int8.w8a8_epilogue(y[:t] - y[t:], xs, ws, q.bias, x.dtype)

    return run


def competitors(lin_bf16: nn.Linear) -> tuple[dict[str, Callable], dict[str, str]]:
    """name -> f(x bf16 [T, in]); plus name -> note (kernel chosen, or why a peer is missing)."""
    out_f, in_f = lin_bf16.weight.shape
    fns: dict[str, Callable] = {}
    notes: dict[str, str] = {}
    lin32 = copy.deepcopy(lin_bf16).float()
    fns["bf16 nn.Linear"] = lin_bf16
    fns["fp32 nn.Linear"] = lambda x: lin32(x.float())
    for label, (wf, af) in SCHEMES.items():
        if wf == "int4_g128" and in_f % 128:
            continue
        q = quantize_linear(lin_bf16, wf, mode="real", act_format=af)
        fns[label] = q
        notes[label] = q.kernel.name
        if label == "W8A8 int8":
            fns["raw torch._int_mm (codes only)"] = lambda x, codes=q.weight_codes: _raw_int_mm(x, codes)
            try:
                fns[W8A8_ONEDNN] = _w8a8_onednn(q)
                notes[W8A8_ONEDNN] = "onednn.qlinear_pointwise"
            except Exception as exc:  # noqa: BLE001 - a torch build without oneDNN
                notes[W8A8_ONEDNN] = f"unavailable: {type(exc).__name__}: {exc}"[:160]
    for label, wf in OPT_IN_INT4X2.items():
        q = _int4x2(lin_bf16, wf)
        fns[label] = q
        notes[label] = q.kernel.label
    try:
        fns["bitsandbytes Linear8bitLt"] = _bnb(lin_bf16)
    except Exception as exc:  # noqa: BLE001 - a peer that can't run is reported, not fatal
        notes["bitsandbytes Linear8bitLt"] = f"unavailable: {type(exc).__name__}: {exc}"[:160]
    for kind, label in (("int8wo", "torchao int8 weight-only"), ("int8dyn", "torchao int8 dyn-act"),
                        ("int4wo", "torchao int4 weight-only g128")):
        if kind == "int4wo" and in_f % 128:
            continue
        try:
            m = _torchao(lin_bf16, kind)
            notes[label] = type(m[0].weight).__name__
            fns[label] = m
        except Exception as exc:  # noqa: BLE001
            notes[label] = f"unavailable: {type(exc).__name__}: {exc}"[:160]
    return fns, notes


def _measure(fn: Callable, x: torch.Tensor, inner: int) -> float:
    """CPU seconds per call, averaged over ``inner`` back-to-back calls."""
    c0 = time.thread_time()
    for _ in range(inner):
        fn(x)
    return (time.thread_time() - c0) / inner


@torch.inference_mode()
def layer_rows(rounds: int, shapes: list, rows_list: tuple[int, ...]) -> list[dict]:
    out = []
    for model, layer, out_f, in_f in shapes:
        torch.manual_seed(0)
        lin = nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
        fns, notes = competitors(lin)
        for rows in rows_list:
            x = torch.randn(rows, in_f, dtype=torch.bfloat16)
            first, errors = {}, {}
            for name, fn in list(fns.items()):
                try:
                    first[name] = _measure(fn, x, 1)  # warm-up: kernel caches, allocator, packing
                except Exception as exc:  # noqa: BLE001
                    errors[name] = f"{type(exc).__name__}: {exc}"[:160]
            live = {k: v for k, v in fns.items() if k in first}
            inner = {k: max(1, int(MIN_MEASURE_S / max(first[k], 1e-6))) for k in live}
            times: dict[str, list[float]] = {k: [] for k in live}
            for r in range(rounds):  # interleaved: machine load hits every competitor alike
                for k, fn in live.items():
                    if r > 0 and first[k] > SLOW_CALL_S:
                        continue
                    times[k].append(_measure(fn, x, inner[k]))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            bf16 = med["bf16 nn.Linear"]
            checks = {}
            if W8A8_ONEDNN in live:  # the probe must be the same W8A8 arithmetic, bit for bit
                checks[f"{W8A8_ONEDNN} bitwise equal to W8A8 int8"] = torch.equal(live[W8A8_ONEDNN](x),
                                                                                 live["W8A8 int8"](x))
            row = {"model": model, "layer": layer, "out": out_f, "in": in_f, "rows": rows,
                   "ms": {k: round(v, 4) for k, v in med.items()},
                   "speedup_vs_bf16": {k: round(bf16 / v, 3) for k, v in med.items()},
                   "rounds": {k: len(v) for k, v in times.items()}, "kernels": notes, "errors": errors,
                   "checks": checks}
            out.append(row)
            print(f"  {model} {layer} {out_f}x{in_f} rows={rows}: bf16 {bf16:.3f} ms; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in med.items() if k != "bf16 nn.Linear"), flush=True)
    return out


# -- end to end ----------------------------------------------------------------------------------
def _quantize_model(dense: nn.Module, tok, wf: str, af: str | None) -> nn.Module:
    from quantkit.arch import arch_info
    from quantkit.context import Context
    from quantkit.passes.quantize import Quantize

    model = copy.deepcopy(dense)
    ctx = Context(model=model, tokenizer=tok, arch=arch_info(model), device=torch.device("cpu"))
    Quantize(format=wf, act_format=af, mode="real").run(model, ctx)
    return model


def e2e_rows(windows: int, schemes: dict) -> list[dict]:
    from quantkit.eval import perplexity
    from quantkit.models import load_model
    from quantkit.nn.kernels import kernel_summary

    dense, tok = load_model("smollm2-135m", dtype=torch.bfloat16)
    perplexity(dense, tok, max_windows=1)  # warm-up: token cache, allocator
    variants = [("bf16 (no quantization)", None)] + list(schemes.items())
    rows = []
    for label, spec in variants:
        model = dense if spec is None else _quantize_model(dense, tok, *spec)
        if spec is not None:
            perplexity(model, tok, max_windows=1)  # first call: int4 repacking, scratch allocation
        w0, c0 = time.perf_counter(), time.process_time()
        ppl = perplexity(model, tok, max_windows=windows)
        cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - w0
        kernels = sorted({r["kernel"] for r in kernel_summary(model)})
        rows.append({"variant": label, "ppl": round(ppl, 4), "eval_cpu_s": round(cpu_s, 2),
                     "eval_wall_s": round(wall_s, 2), "kernels": kernels})
        print(f"  {label:28s} ppl {ppl:.4f}  eval {cpu_s:.1f} s CPU ({wall_s:.1f} s wall)  {kernels}", flush=True)
        if model is not dense:
            del model
            gc.collect()
    base = rows[0]
    for r in rows:
        r["speedup_vs_bf16_cpu"] = round(base["eval_cpu_s"] / r["eval_cpu_s"], 3)
        r["speedup_vs_bf16_wall"] = round(base["eval_wall_s"] / r["eval_wall_s"], 3)
    return rows


# -- memory (one subprocess per scheme) ----------------------------------------------------------
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_child(label: str) -> dict:
    from quantkit.models import load_model

    torch.set_num_threads(1)
    dense, tok = load_model("smollm2-135m", dtype=torch.bfloat16)
    if label in OPT_IN_INT4X2:
        from quantkit.nn.kernels.select import FP4_DECODE_ENV

        os.environ[FP4_DECODE_ENV] = "int4x2"  # this child process only
        spec = (OPT_IN_INT4X2[label], None)
    else:
        spec = None if label == "bf16" else SCHEMES[label]
    dense_linear_bytes = 0
    if spec is not None:
        names = {n for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
        model = _quantize_model(dense, tok, *spec)
        q_names = {n for n, m in model.named_modules() if isinstance(m, QLinear)}
        dense_linear_bytes = sum(_tensor_bytes(dense.get_submodule(n).weight) for n in q_names & names)
        del dense
    else:
        model = dense
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    ids = torch.randint(0, 1000, (1, 512))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
        model(input_ids=ids[:, :1], use_cache=False)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    # every storage once: a buffer may be a view of a kernel table (INT4's weight_scale), and a
    # cache may share a buffer's storage; model tensors + kernel caches = what the model holds
    seen: set[int] = set()

    def _new_bytes(t: torch.Tensor) -> int:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    total = packed = caches = 0
    largest_layer_dense = 0
    for m in model.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            total += _new_bytes(t)
    for m in model.modules():
        if isinstance(m, QLinear):
            packed += m.qweight.nbytes
            caches += sum(_new_bytes(t) for t in m._kcache.values())
            largest_layer_dense = max(largest_layer_dense, m.out_features * m.in_features * 2)
    return {"variant": label, "model_tensor_mb": round(total / 2**20, 2), "packed_linear_mb": round(packed / 2**20, 2),
            "dense_bf16_linear_mb": round(dense_linear_bytes / 2**20, 2),
            "kernel_cache_mb": round(caches / 2**20, 2), "tile_scratch_mb": round(tiled.scratch_bytes() / 2**20, 2),
            "largest_layer_bf16_mb": round(largest_layer_dense / 2**20, 2), "rss_mb": round(_rss_mb(), 1)}


def memory_rows(labels: list[str]) -> list[dict]:
    rows = []
    for label in ["bf16", *labels]:
        proc = subprocess.run([sys.executable, __file__, "--memory-child", label], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            rows.append({"variant": label, "error": (proc.stderr or proc.stdout)[-300:]})
            continue
        rows.append(json.loads(lines[-1]))
        print(f"  {rows[-1]}", flush=True)
    return rows


# -- torch.compile of the W8A8 activation quantization -------------------------------------------
COMPILE_LAYERS = [("SmolLM2", "q/o_proj", 576, 576), ("SmolLM2", "down_proj", 576, 1536),
                  ("Llama-7B", "q/k/v/o_proj", 4096, 4096)]


def _interleaved(fns: dict[str, Callable], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median CPU ms per call of each fn on x, calls interleaved round by round."""
    inner = max(1, int(MIN_MEASURE_S / max(_measure(next(iter(fns.values())), x, 1), 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_measure(fn, x, inner))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


@torch.inference_mode()
def compile_rows(rounds: int, prov: dict) -> dict:
    """The data behind QUANTKIT_COMPILE being off by default: inductor's first compile of the
    per-token activation quantization, eager vs compiled per call, the whole W8A8 layer with and
    without it, and how many layer calls it takes to win the compile time back."""
    from quantkit.nn.kernels import int8 as k_int8

    # the run's provenance as it started (HEAD may move while a long run goes on; the code is loaded)
    out: dict = {"provenance": prov, "act_quant": [], "layer": []}
    torch._dynamo.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = torch.compile(lambda t: k_int8.act_codes(t, torch.float32), dynamic=True)
    compiled(torch.randn(512, 576, dtype=torch.bfloat16))
    out["first_compile_s"] = round(time.perf_counter() - t0, 1)
    out["first_compile_cpu_s"] = round(time.process_time() - c0, 1)
    for rows, k in ((1, 576), (512, 576), (1, 4096), (512, 4096)):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        w0 = time.perf_counter()
        compiled(x)  # dynamic shapes: a new size class may recompile
        first = time.perf_counter() - w0
        med = _interleaved({"eager": lambda t: k_int8.act_codes(t, torch.float32), "compiled": compiled}, x, rounds)
        out["act_quant"].append({"rows": rows, "in": k, "first_call_s": round(first, 2),
                                 "eager_ms": round(med["eager"], 4), "compiled_ms": round(med["compiled"], 4)})
        print(f"  act quant {rows}x{k}: eager {med['eager']:.3f} ms, compiled {med['compiled']:.3f} ms "
              f"(first call {first:.1f} s)", flush=True)
    # the whole layer as QLinear runs it, QUANTKIT_COMPILE off and on (same module, same inputs)
    previous = os.environ.get(k_int8.COMPILE_ENV)
    try:
        for model, layer, out_f, in_f in COMPILE_LAYERS:
            torch.manual_seed(0)
            q = quantize_linear(nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16), "int8", mode="real",
                                act_format="int8")
            for rows in (1, 512):
                x = torch.randn(rows, in_f, dtype=torch.bfloat16)

                def run(t, flag):
                    os.environ[k_int8.COMPILE_ENV] = flag
                    return q(t)

                os.environ[k_int8.COMPILE_ENV] = "1"
                same = torch.equal(q(x), run(x, "0"))  # compiled and eager give the same bits
                med = _interleaved({"eager": lambda t: run(t, "0"), "compiled": lambda t: run(t, "1")}, x, rounds)
                gain = med["eager"] - med["compiled"]
                out["layer"].append({"model": model, "layer": layer, "out": out_f, "in": in_f, "rows": rows,
                                     "eager_ms": round(med["eager"], 4), "compiled_ms": round(med["compiled"], 4),
                                     "bitwise_equal": same,
                                     "calls_to_repay_compile": (round(out["first_compile_cpu_s"] * 1e3 / gain)
                                                                if gain > 0 else None)})
                print(f"  W8A8 {model} {layer} x{rows}: {out['layer'][-1]}", flush=True)
    finally:
        if previous is None:
            os.environ.pop(k_int8.COMPILE_ENV, None)
        else:
            os.environ[k_int8.COMPILE_ENV] = previous
    out["compile_failed"] = list(k_int8.compile_failed)
    out["loadavg_end"] = os.getloadavg()
    return out


# -- torch.compile of a fused FP4 "LUT dequant + GEMV" (a probe, not a quantkit route) ------------
FP4_COMPILE_SHAPES = [("SmolLM2", "q/o_proj", 576, 576), ("Llama-7B", "q/k/v/o_proj", 4096, 4096)]


def _fp4_lut_gemv(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x fp32 [1, K]; codes uint8 [N, K/2]; d fp32 [N, K/16] (NVFP4 divisors); lut fp32 [16] -> [1, N].

    Written so inductor can fuse it without materializing the weight: even/odd inputs against low/
    high nibbles (no stack), a 16-wide reduction per block, then the block scales (a first version
    with torch.stack materialized the whole fp32 weight and ran at 0.06-0.2x of bf16).
    """
    n, k = codes.shape[0], x.shape[1]
    nb = k // 16
    xe, xo = x.view(nb, 8, 2)[..., 0], x.view(nb, 8, 2)[..., 1]  # [nb, 8] even / odd inputs
    c = codes.view(n, nb, 8).to(torch.int32)  # [N, nb, 8] bytes: low nibble = even element
    part = (xe * lut[c & 15] + xo * lut[c >> 4]).sum(-1)  # [N, nb] per-block dot products
    return (part * d).sum(-1)[None]


@torch.inference_mode()
def fp4_compile_rows(rounds: int, prov: dict) -> dict:
    """Compile time (cold and warm inductor cache) and per-call time of the fused FP4 GEMV vs bf16."""
    import tempfile

    from quantkit.formats import e2m1, get_format

    out: dict = {"provenance": prov, "rows": []}
    lut = e2m1._CODE_LUT.clone()
    fmt = get_format("nvfp4")
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # an empty on-disk cache: the first compile is cold
        try:
            for model, layer, out_f, in_f in FP4_COMPILE_SHAPES:
                torch.manual_seed(0)
                lin = nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
                q = fmt.quantize(lin.weight.detach())
                d = fmt.divisor(q.scale, q.global_scale)
                x = torch.randn(1, in_f, dtype=torch.bfloat16)
                compile_s = {}
                for kind in ("cold", "warm"):  # warm: dynamo reset, inductor's on-disk cache kept
                    torch._dynamo.reset()
                    fn = torch.compile(_fp4_lut_gemv, dynamic=False)
                    w0, c0 = time.perf_counter(), time.process_time()
                    y = fn(x.float(), q.codes, d, lut)
                    compile_s[kind] = (round(time.perf_counter() - w0, 2), round(time.process_time() - c0, 2))
                ref = x.float() @ fmt.dequantize(q, torch.float32).t()
                err = float((y - ref).abs().max() / (x.float().abs() @ fmt.dequantize(q).abs().t()).max())
                med = _interleaved({"bf16": lin, "compiled": lambda t: fn(t.float(), q.codes, d, lut)}, x, rounds)
                out["rows"].append({"model": model, "layer": layer, "out": out_f, "in": in_f, "rows": 1,
                                    "cold_compile_wall_s": compile_s["cold"][0], "cold_compile_cpu_s": compile_s["cold"][1],
                                    "warm_compile_wall_s": compile_s["warm"][0], "warm_compile_cpu_s": compile_s["warm"][1],
                                    "bf16_ms": round(med["bf16"], 4), "compiled_ms": round(med["compiled"], 4),
                                    "speedup_vs_bf16": round(med["bf16"] / med["compiled"], 3),
                                    "max_err_rel_to_sum_abs": err})
                print(f"  fp4 compiled GEMV {model} {layer}: {out['rows'][-1]}", flush=True)
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
            torch._dynamo.reset()
    return out


# -- report --------------------------------------------------------------------------------------
def _goal_rows(layers: list[dict]) -> list[dict]:
    out = []
    for scheme, (need_prefill, need_decode) in GOALS.items():
        for rows, need in ((512, need_prefill), (1, need_decode)):
            cells = [r for r in layers if r["rows"] == rows and scheme in r["speedup_vs_bf16"]]
            if not cells:
                continue
            speed = [r["speedup_vs_bf16"][scheme] for r in cells]
            met = sum(s >= need for s in speed)
            out.append({"scheme": scheme, "rows": rows, "need_speedup": round(need, 3),
                        "min": min(speed), "median": statistics.median(speed), "max": max(speed),
                        "shapes_met": met, "shapes": len(speed)})
    return out


def markdown(res: dict) -> str:
    p = res["provenance"]
    out = ["# Real-mode runtime: quantkit kernels vs bf16/fp32 and CPU peers", "",
           f"Commit `{p['commit'][:12]}`{' (runtime files modified)' if p['runtime_files_dirty'] else ''}, "
           f"`{p['command']}`.  ",
           f"Machine: {p['machine']['cores']} cores, {p['machine']['torch_cpu_capability']}, VNNI "
           f"{'yes' if p['machine']['vnni'] else 'no'}; load average {p['machine']['loadavg_start'][0]:.1f} at start, "
           f"{res['loadavg_end'][0]:.1f} at end (the machine is shared).  ",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v) + ".", ""]
    runs = res.get("section_runs", {})
    if runs:
        out += ["Sections measured by different runs:", ""]
        out += [f"- {k}: commit `{v['commit'][:12]}`, `{v['command']}`, load average {v['loadavg_start'][0]:.1f} at "
                f"start" for k, v in runs.items()]
        out.append("")
    if res.get("layers"):
        out += [f"## Layers: median CPU ms per call, {res['threads']} thread, {res['rounds']} interleaved rounds",
                "", "Speed-up vs bf16 nn.Linear in brackets (>1 is faster). bf16 input. "
                f"Competitors whose first call took > {SLOW_CALL_S:.0f} s were timed in one round.", ""]
        names = list(res["layers"][0]["ms"].keys())
        for r in res["layers"]:
            names += [k for k in r["ms"] if k not in names]
        out.append("| shape (out x in) | rows | " + " | ".join(names) + " |")
        out.append("|---|---|" + "---|" * len(names))
        for r in res["layers"]:
            cells = [f"{r['ms'][n]:.3f} ({r['speedup_vs_bf16'][n]:.2f}x)" if n in r["ms"] else "-" for n in names]
            out.append(f"| {r['model']} {r['layer']} {r['out']}x{r['in']} | {r['rows']} | " + " | ".join(cells) + " |")
        kernels = {k: v for r in res["layers"] for k, v in r["kernels"].items()}
        out += ["", "Kernels / peer weight types: " + "; ".join(f"{k}: `{v}`" for k, v in kernels.items()), ""]
        checks = [f"{r['model']} {r['layer']} x{r['rows']}: {k} {'yes' if v else 'NO'}"
                  for r in res["layers"] for k, v in r.get("checks", {}).items()]
        if checks:
            out += ["Checks: " + "; ".join(checks), ""]
        errs = {k: v for r in res["layers"] for k, v in r["errors"].items()}
        if errs:
            out += ["Errors: " + "; ".join(f"{k}: {v}" for k, v in errs.items()), ""]
        out += ["## Goals (issue 15): speed-up vs bf16 over all shapes", "",
                "| scheme | rows | needed | min | median | max | shapes meeting it |", "|---|---|---|---|---|---|---|"]
        for g in res["goals"]:
            out.append(f"| {g['scheme']} | {g['rows']} | >= {g['need_speedup']:.2f}x | {g['min']:.2f}x | "
                       f"{g['median']:.2f}x | {g['max']:.2f}x | {g['shapes_met']}/{g['shapes']} |")
        out.append("")
    if res.get("e2e"):
        out += [f"## End to end: SmolLM2-135M perplexity, {res['windows']} x 512 held-out windows, real mode, "
                f"{res['threads']} thread", "",
                "| variant | ppl | eval CPU s | eval wall s | speed-up vs bf16 (CPU) | kernels |", "|---|---|---|---|---|---|"]
        for r in res["e2e"]:
            out.append(f"| {r['variant']} | {r['ppl']:.3f} | {r['eval_cpu_s']:.1f} | {r['eval_wall_s']:.1f} | "
                       f"{r['speedup_vs_bf16_cpu']:.2f}x | {', '.join(r['kernels'])} |")
        out.append("")
    if res.get("compile"):
        c = res["compile"]
        out += ["## torch.compile (inductor) of the W8A8 per-token activation quantization", "",
                f"First compile: {c['first_compile_s']} s wall, {c.get('first_compile_cpu_s', '?')} s CPU (commit "
                f"`{c['provenance']['commit'][:12]}`, `{c['provenance']['command']}`, load "
                f"{c['provenance']['machine']['loadavg_start'][0]:.1f}).", "",
                "| rows x in | eager ms | compiled ms | first call of this size s |", "|---|---|---|---|"]
        for r in c["act_quant"]:
            out.append(f"| {r['rows']}x{r['in']} | {r['eager_ms']:.3f} | {r['compiled_ms']:.3f} | {r['first_call_s']} |")
        if c.get("layer"):
            out += ["", "Whole W8A8 layer (QLinear forward), QUANTKIT_COMPILE=0 vs 1, median CPU ms per call:", "",
                    "| layer | rows | eager ms | compiled ms | bitwise equal | calls to repay the compile CPU time |",
                    "|---|---|---|---|---|---|"]
            for r in c["layer"]:
                repay = "never (not faster)" if r["calls_to_repay_compile"] is None else f"{r['calls_to_repay_compile']:,}"
                out.append(f"| {r['model']} {r['layer']} {r['out']}x{r['in']} | {r['rows']} | {r['eager_ms']:.3f} | "
                           f"{r['compiled_ms']:.3f} | {'yes' if r['bitwise_equal'] else 'no'} | {repay} |")
        if c.get("compile_failed"):
            out += ["", f"Compile failed: {c['compile_failed'][0]}"]
        out.append("")
    if res.get("fp4_compile"):
        c = res["fp4_compile"]
        out += ["## torch.compile (inductor) of a fused FP4 LUT-dequant + GEMV (NVFP4, one row; a probe)", "",
                f"Commit `{c['provenance']['commit'][:12]}`, `{c['provenance']['command']}`, load "
                f"{c['provenance']['machine']['loadavg_start'][0]:.1f}. Compile CPU time is the main process only "
                "(inductor's compile workers are not counted). Error: max |y - ref| / max(|x| @ |W|.T), fp32.", "",
                "| layer | cold compile s wall (CPU) | warm compile s wall (CPU) | bf16 ms | compiled ms | speed-up vs bf16 "
                "| error |", "|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            out.append(f"| {r['model']} {r['layer']} {r['out']}x{r['in']} | {r['cold_compile_wall_s']} "
                       f"({r['cold_compile_cpu_s']}) | {r['warm_compile_wall_s']} ({r['warm_compile_cpu_s']}) | "
                       f"{r['bf16_ms']:.3f} | {r['compiled_ms']:.3f} | {r['speedup_vs_bf16']:.2f}x | "
                       f"{r['max_err_rel_to_sum_abs']:.1e} |")
        out.append("")
    if res.get("memory"):
        out += ["## Memory: SmolLM2-135M in real mode after a 512-token and a 1-token forward (fresh process each)", "",
                "| variant | model tensors MB | packed linears MB | dense bf16 of those linears MB | kernel caches MB "
                "| tile scratch MB | largest layer bf16 MB | RSS MB |", "|---|---|---|---|---|---|---|---|"]
        for r in res["memory"]:
            if "error" in r:
                out.append(f"| {r['variant']} | error: {r['error'][-120:]!r} |||||||")
                continue
            out.append(f"| {r['variant']} | {r['model_tensor_mb']} | {r['packed_linear_mb']} | {r['dense_bf16_linear_mb']} | "
                       f"{r['kernel_cache_mb']} | {r['tile_scratch_mb']} | {r['largest_layer_bf16_mb']} | {r['rss_mb']} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 1 by default: on a CPU shared with other jobs, multi-threaded ops wait on their slowest
    # thread at every op; every competitor runs with the same setting
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only (a smoke run)")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--fp4-compile", action="store_true", help="also probe a torch.compile'd fused FP4 GEMV")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return {}
    torch.set_num_threads(args.threads)
    res: dict = {"provenance": provenance(argv), "threads": args.threads, "rounds": args.rounds, "windows": args.windows}
    if not args.skip_layers:
        print("layers", flush=True)
        shapes = [s for s in SHAPES if not args.quick or s[0] == "SmolLM2"]
        res["layers"] = layer_rows(args.rounds, shapes, ROWS)
        res["goals"] = _goal_rows(res["layers"])
    if not args.skip_e2e:
        print("end to end", flush=True)
        e2e = {k: v for k, v in SCHEMES.items() if k != "W4A16 int4 g128"}  # SmolLM2's 576 is not a multiple of 128
        res["e2e"] = e2e_rows(args.windows, e2e)
    if not args.skip_memory:
        print("memory", flush=True)
        res["memory"] = memory_rows([k for k in SCHEMES if k != "W4A16 int4 g128"] + list(OPT_IN_INT4X2))
    if not args.skip_compile:
        print("compile", flush=True)
        res["compile"] = compile_rows(args.rounds, res["provenance"])
    if args.fp4_compile:
        print("fp4 compile", flush=True)
        res["fp4_compile"] = fp4_compile_rows(args.rounds, res["provenance"])
    res["loadavg_end"] = os.getloadavg()
    # which run measured each section: a skipped section keeps its rows and its run's provenance
    res["section_runs"] = {k: {"commit": res["provenance"]["commit"], "command": res["provenance"]["command"],
                               "loadavg_start": res["provenance"]["machine"]["loadavg_start"],
                               "loadavg_end": res["loadavg_end"]}
                           for k in ("layers", "e2e", "memory", "compile", "fp4_compile") if k in res}
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous = RESULTS / f"{NAME}.json"
    if previous.exists():  # a skipped section keeps its last measured rows (and their provenance)
        old = json.loads(previous.read_text())
        for key in ("layers", "goals", "e2e", "memory", "compile", "fp4_compile"):
            if key not in res and key in old:
                res[key] = old[key]
                if key in ("layers", "e2e", "memory", "compile", "fp4_compile"):
                    res["section_runs"][key] = old.get("section_runs", {}).get(key) or {
                        "commit": old["provenance"]["commit"], "command": old["provenance"]["command"],
                        "loadavg_start": old["provenance"]["machine"]["loadavg_start"],
                        "loadavg_end": old.get("loadavg_end")}
        if args.skip_layers and "layers" in old:  # the header describes the run that measured the layers
            res["provenance"] = old.get("provenance", res["provenance"])
            res["threads"], res["rounds"], res["windows"] = old.get("threads"), old.get("rounds"), old.get("windows")
            res["loadavg_end"] = old.get("loadavg_end", res["loadavg_end"])
    (RESULTS / f"{NAME}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
