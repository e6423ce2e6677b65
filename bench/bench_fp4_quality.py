"""FP4 quality knobs on SmolLM2-135M: observer x weighting (x GPTQ x rotation when measured).

Honest selection: the calibration articles of calib_data/wiki_calib.jsonl are split by article
into a calibration part (3 of every 4 articles) and a development part (every 4th). Activation
statistics come from the calibration part; settings are chosen on the development perplexity;
the held-out split (calib_data/wiki_eval.jsonl, via quantkit.eval.perplexity) is reported and
never used to choose. Every config is scored on the same windows.

Weights are quantized from the bf16 checkpoint as export would (fused q/k/v and gate/up share one
NVFP4 global scale) into fake-mode QLinears; the model then runs in fp32. W4A4 schemes quantize
activations too (NVFP4: static input global scale from the calibration amax).

    nice -n 10 .venv/bin/python bench/bench_fp4_quality.py [--windows 8] [--configs nvfp4a16:minmax:none,...]
writes bench/results/<--name, default fp4_quality>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quantkit.arch import arch_info  # noqa: E402
from quantkit.calib import read_texts, token_stream  # noqa: E402
from quantkit.eval import perplexity  # noqa: E402
from quantkit.formats import get_format  # noqa: E402
from quantkit.formats.observers import OBSERVERS  # noqa: E402
from quantkit.models import load_model  # noqa: E402
from quantkit.nn.qlinear import QLinear  # noqa: E402
from quantkit.passes.quantize import Quantize  # noqa: E402
from quantkit.targets import Targets, set_module  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCHEMES = {  # name -> (weight format, activation format)
    "nvfp4a16": ("nvfp4", None),
    "nvfp4": ("nvfp4", "nvfp4"),
    "mxfp4a16": ("mxfp4", None),
    "mxfp4": ("mxfp4", "mxfp4"),
}
WEIGHTINGS = ("none", "channel", "hessian")
DEFAULT_CONFIGS = [
    "bf16",
    *(f"nvfp4a16:{o}:none" for o in ("minmax", "mse", "e4m3_local", "four_over_six")),
    "nvfp4a16:e4m3_local:channel", "nvfp4a16:e4m3_local:hessian",
    "mxfp4a16:minmax:none", "mxfp4a16:mx_exp:none", "mxfp4a16:mx_exp:channel", "mxfp4a16:mx_exp:hessian",
]
DEV_EVERY = 4  # every 4th calibration article is development text
CALIB_SAMPLES, SEQ_LEN, SEED = 16, 512, 0


# -- data -------------------------------------------------------------------------------------
def split_calib_texts() -> tuple[list[str], list[str]]:
    """(calibration articles, development articles), split by whole article."""
    from quantkit.calib import DEFAULT_SOURCE

    texts = read_texts(DEFAULT_SOURCE, "calib")
    calib = [t for i, t in enumerate(texts) if i % DEV_EVERY != DEV_EVERY - 1]
    dev = [t for i, t in enumerate(texts) if i % DEV_EVERY == DEV_EVERY - 1]
    return calib, dev


def windows_of(tok, texts: list[str], n: int | None, seed: int | None) -> torch.Tensor:
    """Non-overlapping SEQ_LEN windows [N, SEQ_LEN]; seeded pick of n, or the first n in order."""
    stream = token_stream(tok, texts)
    w = stream[: stream.numel() // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    if seed is not None:
        pick = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return w[pick].contiguous()
    return w[:n] if n else w


@torch.inference_mode()
def window_ppl(model, windows: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@torch.inference_mode()
def collect_stats(model, names: list[str], calib: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per linear: E[x^2] per input channel [in], X^T X [in, in] (fp32), amax of |x| (scalar)."""
    stats: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    tokens = {"n": 0}

    def hook_for(name):
        def hook(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [T, in]
            s = stats[name]
            s["sq"] = s.get("sq", 0) + x.square().sum(0)
            s["h"] = s.get("h", 0) + x.T @ x
            s["amax"] = torch.maximum(s.get("amax", torch.zeros(())), x.abs().amax())
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        for i in range(0, calib.shape[0], 4):
            model(input_ids=calib[i : i + 4], use_cache=False, logits_to_keep=1)
            tokens["n"] += calib[i : i + 4].numel()
    finally:
        for h in hooks:
            h.remove()
    for s in stats.values():
        s["sq"] = s["sq"] / tokens["n"]
    return stats


# -- one config -------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def parse_spec(spec: str) -> dict:
    """scheme:observer:weighting[:gptq][:ao][:damp=X][:rotN] -> fields."""
    scheme, observer, weighting, *flags = spec.split(":")
    out = {"scheme": scheme, "observer": observer, "weighting": weighting, "gptq": False, "act_order": False,
           "damp": 0.01, "rot": 0}
    for f in flags:
        if f == "gptq":
            out["gptq"] = True
        elif f == "ao":
            out["act_order"] = True
        elif f.startswith("damp="):
            out["damp"] = float(f[5:])
        elif f.startswith("rot"):
            out["rot"] = int(f[3:])
        else:
            raise ValueError(f"unknown flag {f!r} in {spec}")
    if out["rot"] and SCHEMES[scheme][1] is not None:
        raise ValueError("the bench applies rotations to weight-only schemes only (no online activation quantizer)")
    return out


def _rotate_weights(model, names: list[str], block: int) -> None:
    """W -> W R in place (bf16 storage, as a rotated checkpoint would hold before quantization)."""
    from quantkit.passes.rotate.hadamard import rotate

    for n in names:
        lin = model.get_submodule(n)
        lin.weight.data = rotate(lin.weight.data, block)


def _install(model, n: str, qt, act: str | None, igs, dtype, rot: int, dense: dict) -> QLinear | None:
    """Put the quantized weight in place. With a rotation, y = (x R) Q(W R)^T = x (Q(W R) R^T)^T: weight-only,
    the effective dense weight Q(W R) R^T in fp32 is exact to what an online-transform runtime computes."""
    from quantkit.passes.rotate.hadamard import rotate

    lin = model.get_submodule(n)
    if rot:
        fmt = get_format(qt.format)
        dense[n] = rotate(fmt.dequantize(qt, torch.float64), rot, inverse=True).float()
        lin.weight.data = dense[n].to(lin.weight.dtype)  # model dtype while later layers are calibrated
        return None
    q = QLinear(qt, lin.bias, mode="fake", act_format=act, input_global_scale=igs, compute_dtype=dtype)
    set_module(model, n, q)
    return q


def quantize_model(model, cfg: dict, stats, calib: torch.Tensor) -> dict:
    fmt_name, act = SCHEMES[cfg["scheme"]]
    fmt, arch = get_format(fmt_name), arch_info(model)
    names = Targets().select(model, arch)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    if cfg["rot"]:
        _rotate_weights(model, names, cfg["rot"])
    gs = Quantize(format=fmt_name)._global_scales(model, SimpleNamespace(arch=arch), names)
    act_fmt = None if act is None else get_format(act)
    dense: dict[str, torch.Tensor] = {}  # fp32 effective weights of rotated linears
    if cfg["gptq"]:
        _gptq_model(model, cfg, fmt, gs, act, act_fmt, stats, calib, names, dense)
    else:
        for n in names:
            w = model.get_submodule(n).weight.detach()
            imp = _importance(stats[n], cfg, n)
            qt = OBSERVERS.get(cfg["observer"])(fmt, w, gs.get(n), imp)
            _install(model, n, qt, act, _igs(act_fmt, stats[n], w.dtype), w.dtype, cfg["rot"], dense)
    for n, d in dense.items():  # unrounded: the fp32 forward sees exactly Q(W R) R^T
        model.get_submodule(n).weight.data = d
    err = ref = 0.0
    for n, w in originals.items():
        m = model.get_submodule(n)
        deq = m.dequantized_weight() if isinstance(m, QLinear) else m.weight.float()
        err += (deq - w.float()).square().sum().item()
        ref += w.float().square().sum().item()
    return {"weight_rel_err": (err / ref) ** 0.5, "n_linears": len(names)}


def _igs(act_fmt, st, dtype):
    return None if act_fmt is None else act_fmt.activation_global_scale(st["amax"].to(dtype).reshape(1))


def _importance(st: dict, cfg: dict, n: str) -> torch.Tensor | None:
    if cfg["weighting"] == "none":
        return None
    imp = st["sq" if cfg["weighting"] == "channel" else "h"]
    if cfg["rot"]:  # statistics of the rotated input x R: E[(xR)^2] needs the full X^T X
        from quantkit.passes.rotate.hadamard import rotate

        h = rotate(rotate(st["h"].double(), cfg["rot"]).T, cfg["rot"]).float()  # R^T H R (H symmetric)
        imp = h.diagonal().clone() if cfg["weighting"] == "channel" else h
    return imp


@torch.inference_mode()
def _gptq_model(model, cfg, fmt, gs, act, act_fmt, stats, calib, names, dense) -> None:
    """Sequential GPTQ: layer i's Hessians come from the outputs of layers < i already quantized."""
    from quantkit.passes.gptq.solver import gptq_quantize
    from quantkit.passes.rotate.hadamard import rotate

    arch = arch_info(model)
    layers = arch.layers(model)
    store: list = []

    def grab(_m, args, kwargs):
        store.append((args, kwargs))
        raise _Stop

    hk = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], 4):
            try:
                model(input_ids=calib[i : i + 4], use_cache=False)
            except _Stop:
                pass
    finally:
        hk.remove()
    chosen = set(names)
    for idx, layer in enumerate(layers):
        mine = sorted(n for n in chosen if n.startswith(f"{arch.layers_path}.{idx}."))
        hs: dict[str, torch.Tensor] = {}

        def hook_for(name):
            def hook(_m, args):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                hs[name] = hs.get(name, 0) + x.T @ x
            return hook

        hooks = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in mine]
        try:
            for args, kwargs in store:
                layer(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        for n in mine:
            w = model.get_submodule(n).weight.detach()
            h = hs.pop(n)
            if cfg["rot"]:  # the rotated linear sees x R: its Hessian is R^T H R
                h = rotate(rotate(h.double(), cfg["rot"]).T, cfg["rot"]).float()
            qt, _ = gptq_quantize(fmt, w, h, gs.get(n), dampening=cfg["damp"], observer=cfg["observer"],
                                  act_order=cfg["act_order"], weighting=cfg["weighting"])
            _install(model, n, qt, act, _igs(act_fmt, stats[n], w.dtype), w.dtype, cfg["rot"], dense)
        outs = []
        for args, kwargs in store:
            y = layer(*args, **kwargs)
            outs.append(((y[0] if isinstance(y, tuple) else y, *args[1:]), kwargs))
        store = outs


def run_config(spec: str, windows: int, dev: torch.Tensor, calib: torch.Tensor, cache: dict) -> dict:
    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    model.eval()
    row: dict = {"config": spec}
    t = time.time()
    if spec != "bf16":
        cfg = parse_spec(spec)
        names = Targets().select(model, arch_info(model))
        if "stats" not in cache:
            t0 = time.time()
            cache["stats"] = collect_stats(model, names, calib)
            cache["stats_s"] = round(time.time() - t0, 1)
        row.update(cfg)
        row.update(quantize_model(model, cfg, cache["stats"], calib))
    row["quantize_s"] = round(time.time() - t, 1)
    model.float()  # fp32 compute for every config; QLinear rebuilds its dense cache from the codes
    t = time.time()
    row["dev_ppl"] = window_ppl(model, dev)
    row["heldout_ppl"] = perplexity(model, tok, seq_len=SEQ_LEN, max_windows=windows)
    row["eval_s"] = round(time.time() - t, 1)
    return row


# -- random-weight check ----------------------------------------------------------------------
def tiny_weight_errors() -> list[dict]:
    """Weight rel. error per observer on a random-weight tiny Llama (no Q4_1 origin)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    arch = arch_info(model)
    names = Targets().select(model, arch)
    rows = []
    # e4m3_grid and range_mse (126 and 201 passes per matrix) are left out here: too slow on the
    # shared CPUs; tests/formats/test_observers.py checks them on random weights
    for fmt_name, observers in (("nvfp4", ("minmax", "mse", "e4m3_local", "four_over_six")),
                                ("mxfp4", ("minmax", "mse", "mx_exp"))):
        fmt = get_format(fmt_name)
        gs = Quantize(format=fmt_name)._global_scales(model, SimpleNamespace(arch=arch), names)
        for obs in observers:
            err = ref = 0.0
            for n in names:
                w = model.get_submodule(n).weight.detach()
                qt = OBSERVERS.get(obs)(fmt, w, gs.get(n))
                err += (fmt.dequantize(qt) - w.float()).square().sum().item()
                ref += w.float().square().sum().item()
            rows.append({"format": fmt_name, "observer": obs, "weight_rel_err": (err / ref) ** 0.5})
    return rows


# -- output -----------------------------------------------------------------------------------
def environment(argv: list[str]) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "quantkit", "bench"], capture_output=True,
                           text=True, cwd=ROOT).stdout.strip()
    return {"commit": commit, "tree_dirty": bool(dirty), "command": " ".join([sys.executable, *sys.argv[:1], *argv]),
            "versions": {p: version(p) for p in ("torch", "transformers", "compressed-tensors")},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "loadavg_start": os.getloadavg(), "threads": torch.get_num_threads()}}


def write(out: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out["environment"]["machine"]["loadavg_now"] = os.getloadavg()
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    rows = out["rows"]
    base = next((r for r in rows if r["config"] == "bf16"), None)
    lines = [f"# FP4 quality knobs, SmolLM2-135M ({out['eval']})", "",
             f"Calibration statistics: {out['calib']}. Development ppl chooses; held-out ppl is reported.", "",
             "| scheme | observer | weighting | GPTQ | rotation | weight rel. err | dev ppl | held-out ppl | Δppl held-out | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = f"{r['heldout_ppl'] - base['heldout_ppl']:+.3f}" if base else "-"
        gptq = (f"damp {r['damp']}" + (", act-order" if r.get("act_order") else "")) if r.get("gptq") else "-"
        rot = f"Hadamard {r['rot']}" if r.get("rot") else "-"
        lines.append(f"| {r.get('scheme', 'bf16')} | {r.get('observer', '-')} | {r.get('weighting', '-')} | {gptq} | {rot} | "
                     f"{r.get('weight_rel_err', 0):.4f} | {r['dev_ppl']:.3f} | {r['heldout_ppl']:.3f} | {d} | "
                     f"{r['quantize_s']} |")
    if out.get("tiny"):
        lines += ["", "Random-weight tiny Llama (hidden 128, 2 layers), weight rel. error per observer:", "",
                  "| format | observer | weight rel. err |", "|---|---|---|"]
        lines += [f"| {r['format']} | {r['observer']} | {r['weight_rel_err']:.5f} |" for r in out["tiny"]]
    env = out["environment"]
    lines += ["", f"Commit {env['commit']} (tree dirty: {env['tree_dirty']}); command `{env['command']}`; "
              f"versions {env['versions']}; load average at start {env['machine']['loadavg_start']}, "
              f"at write {env['machine']['loadavg_now']} on {env['machine']['cpus']} CPUs (shared: timings are not "
              "comparable between rows)."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")
    p.add_argument("--dev-windows", type=int, default=8, help="development windows of 512 tokens")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="bf16 or scheme:observer:weighting[:gptq][:ao][:damp=X][:rotN], ...")
    p.add_argument("--no-tiny", action="store_true", help="skip the random-weight tiny-model check")
    p.add_argument("--name", default="fp4_quality", help="results file stem under bench/results/")
    args = p.parse_args(argv)
    _, tok = load_model("smollm2-135m", dtype="bfloat16")
    calib_texts, dev_texts = split_calib_texts()
    calib = windows_of(tok, calib_texts, CALIB_SAMPLES, SEED)
    dev = windows_of(tok, dev_texts, args.dev_windows, None)
    out = {"model": "smollm2-135m", "eval": f"held-out split, {args.windows} windows x {SEQ_LEN} tokens; dev split "
           f"{dev.shape[0]} windows x {SEQ_LEN} from every {DEV_EVERY}th calibration article",
           "calib": f"{CALIB_SAMPLES} x {SEQ_LEN} tokens (seed {SEED}) from the other calibration articles",
           "environment": environment(argv), "rows": [], "tiny": []}
    if not args.no_tiny:
        out["tiny"] = tiny_weight_errors()
        write(out, args.name)
    cache: dict = {}
    for spec in args.configs.split(","):
        row = run_config(spec, args.windows, dev, calib, cache)
        out["rows"].append(row)
        out["stats_s"] = cache.get("stats_s")
        print(json.dumps(row), flush=True)
        write(out, args.name)
    return out


if __name__ == "__main__":
    main()
