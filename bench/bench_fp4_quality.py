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
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.provenance import provenance  # noqa: E402
from quantkit.arch import arch_info  # noqa: E402
from quantkit.calib import read_texts, token_stream  # noqa: E402
from quantkit.formats import get_format  # noqa: E402
from quantkit.formats.observers import OBSERVERS  # noqa: E402
from quantkit.models import load_model  # noqa: E402
from quantkit.nn.qlinear import QLinear, rotate_input  # noqa: E402
from quantkit.passes.gptq import input_stages  # noqa: E402  (true-sequential stages, the gptq pass's)
from quantkit.passes.quantize import Quantize  # noqa: E402
from quantkit.passes.rotate.hadamard import rotate  # noqa: E402
from quantkit.targets import Targets, set_module  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "fp4q"  # token windows handed to the peer, its JSON (git-ignored)
PEER_SCHEMES = {"NVFP4A16": "nvfp4a16", "NVFP4": "nvfp4", "MXFP4A16": "mxfp4a16", "MXFP4": "mxfp4"}
SCHEMES = {  # name -> (weight format, activation format)
    "nvfp4a16": ("nvfp4", None),
    "nvfp4": ("nvfp4", "nvfp4"),
    "mxfp4a16": ("mxfp4", None),
    "mxfp4": ("mxfp4", "mxfp4"),
    # the other MXFP4 exponent rules (mxfp4a16 uses the default, `even`): docs/formats.md's rule table
    **{f"mxfp4a16_{rule}": (f"mxfp4_{rule}", None) for rule in ("floor", "rceil", "ceil")},
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


def calib_in_order(calib: torch.Tensor, order: int) -> torch.Tensor:
    """The calibration windows as picked (order 0), or permuted by seed `order`: the same tokens in another
    order, which changes only the floating-point order of every sum over them."""
    if order == 0:
        return calib
    return calib[torch.randperm(calib.shape[0], generator=torch.Generator().manual_seed(order))].contiguous()


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch: int = 4) -> list[float]:
    """Mean next-token NLL per window; ppl = exp(mean of these) (equal-length windows). The same formula
    as bench/peers/run_llmc_quality.py, so both tools are scored identically."""
    out: list[float] = []
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        out += F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1).tolist()
    return out


def ppl_of(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


@torch.inference_mode()
def collect_stats(model, names: list[str], calib: torch.Tensor, hessian: bool = True,
                  rots: tuple[int, ...] = ()) -> dict[str, dict[str, torch.Tensor]]:
    """Per linear: E[x^2] per input channel [in], amax of |x| (scalar) and, when asked, X^T X [in, in] (fp32;
    the costly part on 2 shared cores, so configs that do not weigh by it skip it) and the amax of the rotated
    input x R per rotation block in rots (an online rotation's activation global scale)."""
    stats: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    tokens = {"n": 0}

    def hook_for(name):
        def hook(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [T, in]
            s = stats[name]
            s["sq"] = s.get("sq", 0) + x.square().sum(0)
            if hessian:
                s["h"] = s.get("h", 0) + x.T @ x
            s["amax"] = torch.maximum(s.get("amax", torch.zeros(())), x.abs().amax())
            for b in rots:
                s[f"amax_rot{b}"] = torch.maximum(s.get(f"amax_rot{b}", torch.zeros(())), rotate(x, b).abs().amax())
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
    """scheme:observer:weighting[:gptq][:ao][:damp=X][:rotN][:orotN[=v]][:rsign][:rotsel][:ts][:r1][:awq[=duo]]
    [:cd=N][:cdd=X][:aq] -> fields."""
    scheme, observer, weighting, *flags = spec.split(":")
    out = {"scheme": scheme, "observer": observer, "weighting": weighting, "gptq": False, "act_order": False,
           "damp": 0.01, "rot": 0}
    for f in flags:
        if f == "gptq":
            out["gptq"] = True
        elif f == "rsign":  # random +-1 signs before the Hadamard (QuIP's random Hadamard); weight-only
            out["rsign"] = True
        elif f == "ts":  # true-sequential GPTQ inside each layer (q/k/v, then o, then gate/up, then down)
            out["ts"] = True
        elif f in ("rotsel", "rotsel=norm"):  # per input-sharing group: keep the rotation only where it lowers the
            out["rotsel"] = f.partition("=")[2] or True  # calibration output error (=norm: per-token relative)
        elif f == "ao":
            out["act_order"] = True
        elif f in ("awq", "awq=duo"):  # AWQ's per-input-channel scale search, folded into the norms / up_proj
            out["awq"] = f.partition("=")[2] or True  # offline; =duo: s = a^alpha / w^(1-alpha) (llm-compressor's)
        elif f == "r1":  # residual-stream rotation (QuaRot R1), fused offline
            out["r1"] = "had"
        elif f.startswith("orot"):  # output-side block Hadamard (QuIP's "u"): W -> P^T W, y -> y' P^T; weight-only.
            b, _, only = f[4:].partition("=")  # =v: v_proj only (with o_proj's input rotation, fusable offline)
            out["orot"], out["orot_only"] = int(b), only or None
        elif f == "aq":  # GPTQ toward the unquantized model's outputs (asymmetric calibration, GPTAQ's target)
            out["aq"] = True
        elif f.startswith("cd="):  # coordinate-descent sweeps over the rounded weights after GPTQ (solver.refine)
            out["cd"] = int(f[3:])
        elif f.startswith("cdd="):  # their dampening (default: GPTQ's)
            out["cdd"] = float(f[4:])
        elif f.startswith("cds="):  # rounds of NVFP4 block-scale refinement alternated with the sweeps
            out["cds"] = int(f[4:])
        elif f.startswith("damp="):
            out["damp"] = float(f[5:])
        elif f.startswith("rotd="):  # down_proj's own Hadamard block (its 1536 inputs allow up to 512)
            out["rotd"] = int(f[5:])
        elif f.startswith("rot"):
            out["rot"] = int(f[3:])
        else:
            raise ValueError(f"unknown flag {f!r} in {spec}")
    return out


def rot_block(cfg: dict, name: str) -> int:
    """The Hadamard block of one linear's input under cfg: :rotd=N for down_proj, else :rotN (0: none)."""
    return cfg["rotd"] if cfg.get("rotd") and name.endswith(".down_proj") else cfg["rot"]


def _paley12() -> torch.Tensor:
    """A Hadamard matrix of order 12 (Paley's construction, q = 11), +-1 entries."""
    q = 11
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def residual_matrix(d: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal Q [d, d] (float64) for the residual stream: diag(random signs) times a Hadamard matrix of
    order d built as a Kronecker product of Paley's order 12 and a Sylvester power of two (QuaRot's random
    Hadamard)."""
    g = torch.Generator().manual_seed(seed)
    h, rest = torch.ones(1, 1, dtype=torch.float64), d
    while rest & (rest - 1) and rest % 12 == 0:  # 576 = 12 * 12 * 4
        h, rest = torch.kron(h, _paley12()), rest // 12
    if rest & (rest - 1):
        raise ValueError(f"no Hadamard construction for residual width {d}")
    from quantkit.nn.qlinear import sylvester
    h = torch.kron(h, sylvester(rest, torch.device("cpu")).to(torch.float64)) / math.sqrt(d)
    signs = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).to(torch.float64)
    return signs[:, None] * h


@torch.no_grad()
def residual_rotate(model) -> None:
    """QuaRot's R1 fused offline into a Llama-layout model: every norm's weight folded into the linears it
    feeds (then 1), the residual stream rotated by Q (embeddings E Q; readers W -> W Q; writers W -> Q^T W; the
    head untied, W_head diag(g) Q). RMSNorm(x Q) = RMSNorm(x) Q, so the function is unchanged; every rewritten
    tensor is rounded to bf16, as a checkpoint would store it."""
    lm = model.model
    q = residual_matrix(model.config.hidden_size)

    def put(mod, w):
        mod.weight.data = w.to(torch.bfloat16).to(mod.weight.dtype)

    head = model.lm_head.weight.detach().double() * lm.norm.weight.double()
    model.lm_head.weight = torch.nn.Parameter((head @ q).to(torch.bfloat16).to(lm.norm.weight.dtype))
    model.config.tie_word_embeddings = False
    put(lm.embed_tokens, lm.embed_tokens.weight.double() @ q)
    lm.norm.weight.data.fill_(1.0)
    for layer in lm.layers:
        at, mlp = layer.self_attn, layer.mlp
        for norm, readers, writer in ((layer.input_layernorm, (at.q_proj, at.k_proj, at.v_proj), at.o_proj),
                                      (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), mlp.down_proj)):
            g = norm.weight.double()
            for lin in readers:
                put(lin, (lin.weight.double() * g) @ q)
            put(writer, q.T @ writer.weight.double())
            norm.weight.data.fill_(1.0)


AWQ_GRID = 20  # alpha in 0, 0.05, ..., 1 (no scaling is always a candidate: the search never loses on its objective)


@torch.no_grad()
def awq_scale(model, cfg: dict, stats: dict) -> dict[str, float]:
    """The awq pass's search (Awq.search) per group of linears sharing an input (gate/up, q/k/v) and for down_proj,
    on H = X^T X of the unscaled model's calibration inputs; W -> W diag(s) and 1/s folded into the norm's weight
    (up_proj's rows for down_proj), every rewritten tensor rounded to bf16 as a checkpoint stores it. SmolLM2's
    Llama layout is written out here; o_proj is left alone (grouped-query heads). -> alpha per group (0: unscaled)."""
    from quantkit.passes.awq import Awq

    awq = Awq(format=SCHEMES[cfg["scheme"]][0], rotation=cfg["rot"], grid=AWQ_GRID, duo_scaling=cfg["awq"] == "duo")
    awq_down = awq.model_copy(update={"rotation": cfg.get("rotd") or cfg["rot"]})  # :rotd: down_proj's own block
    chosen: dict[str, float] = {}

    def rnd(t):
        return t.to(torch.bfloat16).to(torch.float32)

    for i, layer in enumerate(model.model.layers):
        at, mlp, pre = layer.self_attn, layer.mlp, f"model.layers.{i}."
        for key, lins, fold in (("down", [mlp.down_proj], mlp.up_proj),
                                ("gate_up", [mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm),
                                ("qkv", [at.q_proj, at.k_proj, at.v_proj], layer.input_layernorm)):
            first = pre + ("self_attn.q_proj" if key == "qkv" else f"mlp.{key.split('_')[0]}_proj")
            alpha, sc, _errs = (awq_down if key == "down" else awq).search([lin.weight.to(torch.bfloat16) for lin in lins], stats[first]["h"],
                                          rms=stats[first]["sq"].double().sqrt())
            chosen[pre + key] = 0.0 if alpha is None else alpha
            if alpha is None:
                continue
            for lin in lins:
                lin.weight.data = rnd(lin.weight.double() * sc)
            fold.weight.data = rnd(fold.weight.double() / (sc[:, None] if key == "down" else sc))
    return chosen


def _rotated_hessian(h: torch.Tensor, block: int) -> torch.Tensor:
    """R^T H R (H symmetric): the second moment of the rotated input x R."""
    return rotate(rotate(h.double(), block).T, block).float()


def _rotate_weights(model, names: list[str], block: int, signs: dict | None = None) -> None:
    """W -> W R in place (bf16 storage, as a rotated checkpoint would hold before quantization), and x -> x R by a
    forward pre-hook, so the model computes what it computed before until each linear is quantized (GPTQ's
    sequential Hessians run the not-yet-quantized linears; without the hook they saw W R applied to x)."""
    for n in names:
        lin = model.get_submodule(n)
        s = signs[n] if signs else None  # R = diag(s) H; no multiply at all without signs
        lin.weight.data = rotate(lin.weight.data if s is None else lin.weight.data * s, block)
        lin._bench_rot_sign = s
        # the online op as quantkit's runtime and compressed-tensors compute it (fp32; since session 11, was float64)
        lin._bench_rot_hook = lin.register_forward_pre_hook(
            lambda _m, args, b=block, s=s: (rotate_input(args[0] if s is None else args[0] * s.to(args[0].dtype), b),
                                            *args[1:]))


def _rotate_outputs(model, names: list[str], block: int) -> None:
    """W -> P^T W in place (P block-diagonal Hadamard over the output rows; bf16 storage), and y' -> y' P^T by a
    forward hook, so the model computes what it computed before until each linear is quantized."""
    for n in names:
        lin = model.get_submodule(n)
        if lin.bias is not None:
            raise ValueError("orot: linears without bias only")
        lin.weight.data = rotate(lin.weight.data.T, block).T.contiguous()
        lin._bench_orot = block
        lin._bench_orot_hook = lin.register_forward_hook(lambda _m, _a, y, b=block: rotate(y, b, inverse=True))


def _install(model, n: str, qt, act: str | None, igs, dtype, rot: int, dense: dict) -> QLinear | None:
    """Put the quantized weight in place. With a rotation, y = (x R) Q(W R)^T = x (Q(W R) R^T)^T: weight-only,
    the effective dense weight Q(W R) R^T in fp32 is exact to what an online-transform runtime computes; with an
    activation quantizer, a QLinear that rotates its input online before quantizing it (as the rotate pass's).
    An output rotation P (weight-only) adds the row unrotation: P Q(P^T W R) R^T."""
    lin = model.get_submodule(n)
    orot = getattr(lin, "_bench_orot", 0)
    if (rot or orot) and act is None:
        fmt = get_format(qt.format)
        dense[n] = fmt.dequantize(qt, torch.float64)
        if rot:
            lin._bench_rot_hook.remove()  # the dense weight below is the unrotated Q(W R) R^T
            dense[n] = rotate(dense[n], rot, inverse=True)
            if lin._bench_rot_sign is not None:
                dense[n] = dense[n] * lin._bench_rot_sign.double()
        if orot:
            lin._bench_orot_hook.remove()
            dense[n] = rotate(dense[n].T, orot, inverse=True).T
        dense[n] = dense[n].float()
        lin.weight.data = dense[n].to(lin.weight.dtype)  # model dtype while later layers are calibrated
        return None
    q = QLinear(qt, lin.bias, mode="fake", act_format=act, input_global_scale=igs, compute_dtype=dtype)
    q.input_rotation = rot or None
    set_module(model, n, q)
    return q


def quantize_model(model, cfg: dict, stats, calib: torch.Tensor) -> dict:
    fmt_name, act = SCHEMES[cfg["scheme"]]
    fmt, arch = get_format(fmt_name), arch_info(model)
    names = Targets().select(model, arch)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    if cfg.get("rsign") and (act is not None or not cfg["rot"] or not cfg["gptq"]):
        raise ValueError("rsign: weight-only rotated GPTQ rows only")
    if cfg.get("rotsel") and (not cfg["rot"] or not cfg["gptq"] or cfg.get("rsign")):
        raise ValueError("rotsel: rotated GPTQ rows without random signs only")
    if cfg.get("rotd") and (act is not None or not cfg["rot"] or cfg.get("rsign") or cfg.get("rotsel")):
        raise ValueError("rotd: weight-only rows with a plain :rotN only")
    gs_plain = None
    if cfg.get("rotsel"):  # the unrotated alternative's global scales, as export takes them: from bf16
        plain_view = SimpleNamespace(get_submodule=lambda n: SimpleNamespace(weight=originals[n].to(torch.bfloat16)))
        gs_plain = Quantize(format=fmt_name)._global_scales(plain_view, SimpleNamespace(arch=arch), names)
    if cfg["rot"]:
        g = torch.Generator().manual_seed(0)
        signs = {n: (torch.randint(0, 2, (model.get_submodule(n).in_features,), generator=g) * 2 - 1).float()
                 for n in names} if cfg.get("rsign") else None
        for b in sorted({rot_block(cfg, n) for n in names}):
            _rotate_weights(model, [n for n in names if rot_block(cfg, n) == b], b, signs)
    if cfg.get("orot"):
        if act is not None or cfg.get("rotsel"):
            raise ValueError("orot: weight-only rows without rotsel only")
        only = cfg["orot_only"]
        _rotate_outputs(model, [n for n in names if only is None or n.endswith(f".{only}_proj")], cfg["orot"])
    bf16_view = SimpleNamespace(get_submodule=lambda n: SimpleNamespace(weight=model.get_submodule(n).weight.to(torch.bfloat16)))
    gs = Quantize(format=fmt_name)._global_scales(bf16_view, SimpleNamespace(arch=arch), names)  # as export: from bf16
    act_fmt = None if act is None else get_format(act)
    dense: dict[str, torch.Tensor] = {}  # fp32 effective weights of rotated linears
    chosen_rot: dict[str, bool] = {}
    if cfg["gptq"]:
        alt = None if gs_plain is None else {"gs": gs_plain, "w": originals, "chosen": chosen_rot}
        _gptq_model(model, cfg, fmt, gs, act, act_fmt, stats, calib, names, dense, alt)
    else:
        for n in names:
            w = model.get_submodule(n).weight.detach().to(torch.bfloat16)  # the checkpoint's values and dtype
            imp = _importance(stats[n], cfg, n)
            qt = OBSERVERS.get(cfg["observer"])(fmt, w, gs.get(n), imp)
            _install(model, n, qt, act, _igs(act_fmt, stats[n], w.dtype, cfg["rot"]), torch.float32, rot_block(cfg, n),
                     dense)
    for n, d in dense.items():  # unrounded: the fp32 forward sees exactly Q(W R) R^T
        model.get_submodule(n).weight.data = d
    err = ref = 0.0
    for n, w in originals.items():
        m = model.get_submodule(n)
        deq = m.dequantized_weight() if isinstance(m, QLinear) else m.weight.float()
        if isinstance(m, QLinear) and m.input_rotation:  # Q(W R) -> Q(W R) R^T, comparable with W
            deq = rotate(deq.double(), m.input_rotation, inverse=True).float()
        err += (deq - w.float()).square().sum().item()
        ref += w.float().square().sum().item()
    out = {"weight_rel_err": (err / ref) ** 0.5, "n_linears": len(names)}
    if chosen_rot:
        out["rotated_linears"] = sum(chosen_rot.values())
    return out


def _igs(act_fmt, st, dtype, rot: int = 0):
    if act_fmt is None:
        return None
    amax = st[f"amax_rot{rot}" if rot else "amax"]  # an online rotation quantizes x R
    return act_fmt.activation_global_scale(amax.to(dtype).reshape(1))


def _importance(st: dict, cfg: dict, n: str) -> torch.Tensor | None:
    if cfg["weighting"] == "none":
        return None
    imp = st["sq" if cfg["weighting"] == "channel" else "h"]
    if rot_block(cfg, n):  # statistics of the rotated input x R: E[(xR)^2] needs the full X^T X
        h = _rotated_hessian(st["h"], rot_block(cfg, n))
        imp = h.diagonal().clone() if cfg["weighting"] == "channel" else h
    return imp


@torch.inference_mode()
def _gptq_model(model, cfg, fmt, gs, act, act_fmt, stats, calib, names, dense, alt: dict | None = None) -> None:
    """Sequential GPTQ: layer i's Hessians come from the outputs of layers < i already quantized.

    alt (`:rotsel`): per input-sharing group (fused q/k/v, gate/up; o and down alone) GPTQ runs both rotated and
    unrotated, and the group keeps the one whose layer outputs on the calibration inputs are closer to the
    unquantized weights' (|X W^T - Q(X)|^2 summed over the group, activation quantizer included)."""
    from quantkit.passes.gptq.solver import gptq_quantize
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
    fp_store = store  # :aq - the unquantized model's layer inputs, carried alongside
    prefix = {id(m): k for k, m in model.named_modules()}
    for idx, layer in enumerate(layers):
        in_layer = [n for n, _role, _kind in arch.linears(idx) if n in chosen]  # forward order
        fp_layer = copy.deepcopy(layer) if cfg.get("aq") else None  # before any of its linears is quantized
        # :ts (true-sequential) - one stage per group of linears sharing an input, in forward order, each stage's
        # Hessians taken after the stages before it are quantized; otherwise the whole layer at once
        stages = input_stages(SimpleNamespace(arch=arch), idx, in_layer) if cfg.get("ts") else [sorted(in_layer)]
        for mine in stages:
            hs: dict[str, torch.Tensor] = {}
            hooks = _hessian_hooks(model, mine, hs)
            xs: dict[str, list] = {}
            if alt is not None:  # the unrotated inputs: these hooks run before the rotation hooks
                hooks += [model.get_submodule(n).register_forward_pre_hook(
                    lambda _m, args, n=n: xs.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).float()),
                    prepend=True) for n in mine]
            xq: dict[str, list] = {}
            xf: dict[str, list] = {}
            if fp_layer is not None:  # the linears' inputs in both models, after their rotation hooks
                pre = prefix[id(layer)] + "."
                for n in mine:
                    hooks.append(model.get_submodule(n).register_forward_pre_hook(
                        lambda _m, args, n=n: xq.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).float())))
                    hooks.append(fp_layer.get_submodule(n[len(pre):]).register_forward_pre_hook(
                        lambda _m, args, n=n: xf.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).float())))
            try:
                for args, kwargs in store:
                    layer(*args, **kwargs)
                if fp_layer is not None:
                    for args, kwargs in fp_store:
                        fp_layer(*args, **kwargs)
            finally:
                for h in hooks:
                    h.remove()
            targets: dict[str, torch.Tensor] = {}
            for n in list(xq):  # W* = argmin |W' X - W X~|^2 + lam |W' - W|^2 = W + W (C - H)(H + lam I)^-1, C = X~^T X:
                h = hs[n]  # GPTQ of W* on H then minimizes |Q X - W X~|^2 up to the ridge
                c = torch.cat(xf.pop(n)).T @ torch.cat(xq.pop(n))
                hd = h.double() + cfg["damp"] * h.diagonal().mean().double() * torch.eye(h.shape[0], dtype=torch.float64)
                w0 = model.get_submodule(n).weight.detach().double()
                targets[n] = (w0 + torch.linalg.solve(hd, (c - h).double().T @ w0.T).T).to(torch.bfloat16)
            if alt is not None:
                _choose_rotations(model, cfg, fmt, gs, act, act_fmt, stats, arch, idx, mine, hs, xs, dense, alt)
                mine = []
            for n in mine:
                w = targets[n] if n in targets else model.get_submodule(n).weight.detach().to(torch.bfloat16)
                h = hs.pop(n)
                # a rotated linear's Hessian hook runs after its rotation hook: h is already (x R)^T (x R)
                qt, _ = gptq_quantize(fmt, w, h, gs.get(n), dampening=cfg["damp"], observer=cfg["observer"],
                                      act_order=cfg["act_order"], weighting=cfg["weighting"],
                                      refine_sweeps=cfg.get("cd", 0), refine_dampening=cfg.get("cdd"),
                                      refine_scale_rounds=cfg.get("cds", 0))
                _install(model, n, qt, act, _igs(act_fmt, stats[n], torch.bfloat16, cfg["rot"]), torch.float32,
                         rot_block(cfg, n), dense)
        store = _layer_outputs(layer, store)
        if fp_layer is not None:
            fp_store = _layer_outputs(fp_layer, fp_store)
        else:
            fp_store = store


def _layer_outputs(layer, store: list) -> list:
    outs = []
    for args, kwargs in store:
        y = layer(*args, **kwargs)
        outs.append(((y[0] if isinstance(y, tuple) else y, *args[1:]), kwargs))
    return outs


def _choose_rotations(model, cfg, fmt, gs, act, act_fmt, stats, arch, idx, mine, hs, xs, dense, alt) -> None:
    """`:rotsel` for one layer: GPTQ each group rotated and unrotated, install the variant with the lower error."""
    from quantkit.passes.gptq.solver import gptq_quantize
    groups = input_stages(SimpleNamespace(arch=arch), idx, mine)
    rot = cfg["rot"]
    for group in groups:
        variants = {}
        for r in (rot, 0):
            qts, err = {}, 0.0
            for n in group:
                x = torch.cat(xs[n])  # [T, in], unrotated
                w_plain = alt["w"][n].to(torch.bfloat16)
                w = model.get_submodule(n).weight.detach().to(torch.bfloat16) if r else w_plain
                h = hs[n] if r else x.T @ x
                qt, _ = gptq_quantize(fmt, w, h, (gs if r else alt["gs"]).get(n), dampening=cfg["damp"],
                                      observer=cfg["observer"], act_order=cfg["act_order"], weighting=cfg["weighting"])
                q = QLinear(qt, None, mode="fake", act_format=act, input_global_scale=_igs(act_fmt, stats[n],
                            torch.bfloat16, r), compute_dtype=torch.float32)
                q.input_rotation = r or None
                for i in range(0, x.shape[0], 2048):
                    xb = x[i : i + 2048]
                    ref = xb @ w_plain.float().T
                    e = (q(xb).float() - ref).square().sum(-1)
                    if cfg.get("rotsel") == "norm":  # each token's error relative to its output: a few massive
                        e = e / ref.square().sum(-1).clamp_min(1e-12)  # tokens (the first ones) do not decide
                    err += e.sum().item()
                qts[n] = qt
            variants[r] = (err, qts)
        r = rot if variants[rot][0] <= variants[0][0] else 0
        for n in group:
            if not r:  # back to the unrotated weight and input; _install replaces the module (and its hook)
                lin = model.get_submodule(n)
                lin._bench_rot_hook.remove()
                lin.weight.data = alt["w"][n].clone()
            alt["chosen"][n] = bool(r)
            _install(model, n, variants[r][1][n], act, _igs(act_fmt, stats[n], torch.bfloat16, r), torch.float32, r,
                     dense)
        for n in group:
            hs.pop(n, None)
            xs.pop(n, None)


def _hessian_hooks(model, names: list[str], hs: dict) -> list:
    """Forward pre-hooks that add each named linear's X^T X (fp32) into hs[name]; -> their handles."""
    def hook_for(name):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hs[name] = hs.get(name, 0) + x.T @ x
        return hook

    return [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]


def scored(model, row: dict, dev: torch.Tensor, heldout: torch.Tensor) -> dict:
    """row with the model's per-window NLLs and ppl on the development and held-out windows, and the time taken."""
    t = time.time()
    row["dev_nll"] = window_nll(model, dev)
    row["heldout_nll"] = window_nll(model, heldout)
    row["dev_ppl"], row["heldout_ppl"] = ppl_of(row["dev_nll"]), ppl_of(row["heldout_nll"])
    row["eval_s"] = round(time.time() - t, 1)
    return row


def split_specs(text: str) -> list[str]:
    """--configs/--peers items: split on the commas outside brackets, so that a recipe row's override can hold a
    YAML list (recipe:NAME+passes.1.targets.roles=[q,k,v])."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [i for i in [*items, cur] if i]


def parse_recipe_spec(spec: str) -> tuple[str, list[str], list[str]]:
    """recipe:NAME[+key=value ...][+drop=PASS ...] -> (shipped recipe name, --set overrides, pass names dropped).
    Overrides apply first (indices into the shipped recipe's passes), then the drops."""
    name, *extra = spec.removeprefix("recipe:").split("+")
    sets = [e for e in extra if not e.startswith("drop=")]
    drops = [e.removeprefix("drop=") for e in extra if e.startswith("drop=")]
    if not name or any("=" not in e for e in sets):
        raise ValueError(f"bad recipe row {spec!r}: expected recipe:NAME[+key=value][+drop=PASS]")
    return name, sets, drops


def recipe_of(spec: str):
    """The recipe a recipe:NAME[+key=value][+drop=PASS] row runs (NAME a shipped recipe or a YAML path), evaluation
    off; validated as `quantkit apply` validates it."""
    import yaml

    from quantkit.recipe import apply_overrides, parse_recipe, resolve_recipe_path

    name, sets, drops = parse_recipe_spec(spec)
    data = apply_overrides(yaml.safe_load(resolve_recipe_path(name).read_text()), sets, spec)
    missing = [d for d in drops if d not in [p.get("pass") for p in data["passes"]]]
    if missing:
        raise ValueError(f"{spec}: no pass {missing[0]!r} to drop")
    data["passes"] = [p for p in data["passes"] if p.get("pass") not in drops]
    data.setdefault("eval", {})["enabled"] = False
    return parse_recipe(data, spec)


def run_recipe(spec: str, heldout: torch.Tensor, dev: torch.Tensor, calib: torch.Tensor) -> dict:
    """A shipped recipe through the pipeline (`quantkit.apply`, as `quantkit apply` runs it: the model in bf16, its
    own block loop, AWQ statistics from the already-quantized earlier blocks), calibrated on the bench's calibration
    ids; calib+quant s is the report's `passes` time (no load, evaluation or save). Scored like llm-compressor's rows:
    the quantized model cast to fp32, then the same windows."""
    from quantkit import api

    name, sets, drops = parse_recipe_spec(spec)
    recipe = recipe_of(spec)
    q = next(p for p in recipe.passes if getattr(p, "format", None) and p.name in ("gptq", "quantize"))
    scheme = next(k for k, v in SCHEMES.items() if v == (q.format, q.act_format))
    model, tok = load_model("smollm2-135m")  # the checkpoint's bf16, as `quantkit apply` loads it
    batches = [calib[i : i + recipe.calib.batch_size] for i in range(0, calib.shape[0], recipe.calib.batch_size)]
    report = api.apply(recipe, model=model, tokenizer=tok, calib_batches=batches)
    row: dict = {"config": spec, "tool": "quantkit", "recipe": name, "overrides": sets, "dropped": drops,
                 "scheme": scheme, "calib_quant_s": round(report.seconds["passes"], 1), "threads": torch.get_num_threads()}
    rot = next((p for p in recipe.passes if p.name == "rotate" and p.online), None)
    if rot is not None:
        row["rot"] = rot.block_size
    model.float()
    return scored(model, row, dev, heldout)


def run_config(spec: str, heldout: torch.Tensor, dev: torch.Tensor, calib: torch.Tensor, cache: dict) -> dict:
    """Quantize (from the bf16 checkpoint's values) and score one config; fp32 compute throughout."""
    if spec.startswith("recipe:"):
        return run_recipe(spec, heldout, dev, calib)
    model, tok = load_model("smollm2-135m", dtype="float32")  # the bf16 cache's values, exactly, in fp32
    model.eval()
    row: dict = {"config": spec, "tool": "quantkit"}
    t = time.time()
    if spec == "bf16:r1":  # the residual rotation alone, unquantized: its bf16 rounding's cost
        residual_rotate(model)
        row["r1"] = "had"
    elif spec != "bf16":
        cfg = parse_spec(spec)
        if cfg.get("r1"):
            residual_rotate(model)
        if cfg.get("awq"):  # the search reads the unscaled model's statistics (input second moments, X^T X)
            names0 = Targets().select(model, arch_info(model))
            alphas = awq_scale(model, cfg, collect_stats(model, names0, calib, hessian=True))
            row["awq_alpha_mean"] = sum(alphas.values()) / len(alphas)
            row["awq_scaled_groups"] = sum(1 for v in alphas.values() if v > 0)  # (duo: alpha 0 counts as unscaled)
        names = Targets().select(model, arch_info(model))
        need_h = cfg["weighting"] == "hessian" or bool(cfg["rot"] and cfg["weighting"] != "none")
        have_h, have_rots, have_r1 = cache.get("collected", (False, frozenset(), (None, None)))
        act_rot = {cfg["rot"]} if cfg["rot"] and SCHEMES[cfg["scheme"]][1] is not None else set()
        model_kind = (cfg.get("r1"), cfg.get("awq"))
        if model_kind != have_r1:  # statistics of another model: start over
            have_h, have_rots = False, frozenset()
        want = (have_h or need_h, have_rots | act_rot, model_kind)  # what this and earlier configs need
        if "stats" not in cache or want != (have_h, have_rots, have_r1):
            t0 = time.time()
            cache["stats"] = collect_stats(model, names, calib, hessian=want[0], rots=tuple(sorted(want[1])))
            cache["collected"] = want
            cache["stats_s"] = round(time.time() - t0, 1)
        row.update(cfg)
        row.update(quantize_model(model, cfg, cache["stats"], calib))
    row["quantize_s"] = round(time.time() - t, 1)  # includes the statistics sweep when this row ran it (stats_s)
    return scored(model, row, dev, heldout)


# -- llm-compressor in the same run ------------------------------------------------------------
def run_peer_config(spec: str, heldout_file: Path, dev_file: Path | None, calib_file: Path, run: str) -> dict:
    """spec SCHEME:method (bench/peers/run_llmc_quality.py METHODS) -> a row scored on the same windows
    (run: this results file's stem, so that parts running side by side keep their own files)."""
    from bench.peers.common import peer_available, peer_python
    from quantkit.models import default_model_dir

    scheme, method = spec.split(":")
    out = WORK / f"{run}_llmc_{scheme}_{method}.json"
    out.unlink(missing_ok=True)
    windows = [str(heldout_file)] + ([str(dev_file)] if dev_file else [])
    row = {"config": f"llmc:{spec}", "tool": "llm-compressor", "scheme": PEER_SCHEMES[scheme], "method": method}
    if not peer_available():
        return row | {"error": "llm-compressor venv not installed (bash bench/peers/setup_llmcompressor.sh)"}
    cmd = [str(peer_python()), str(ROOT / "bench" / "peers" / "run_llmc_quality.py"), "--model", str(default_model_dir()),
           "--scheme", scheme, "--method", method, "--calib", str(calib_file), "--windows", *windows, "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env | {"TOKENIZERS_PARALLELISM": "false"})
    row["wall_s"] = round(time.time() - t, 1)
    if not out.exists():
        return row | {"error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    res = json.loads(out.read_text())
    if "error" in res:
        return row | {"error": res["error"]}
    row["calib_quant_s"] = round(res["calib_quant_s"], 1)
    row["heldout_nll"] = res["evals"][0]["window_nll"]
    row["heldout_ppl"] = res["evals"][0]["ppl"]
    if dev_file:
        row["dev_nll"], row["dev_ppl"] = res["evals"][1]["window_nll"], res["evals"][1]["ppl"]
    row["peer_versions"] = res["versions"]
    row["peer_threads"] = res.get("threads")  # the peer process's torch threads (its timing depends on them)
    return row


# -- random-weight check ----------------------------------------------------------------------
TINY_ARCHS = ("llama", "qwen2", "gemma", "phi3", "opt")  # tests/tiny_models.py, random weights
TINY_METHODS = {  # format -> (observer, weighting, gptq)
    "nvfp4": [("minmax", "none", False), ("mse", "none", False), ("e4m3_local", "none", False),
              ("four_over_six", "none", False), ("e4m3_local", "channel", False), ("e4m3_local", "hessian", False),
              ("minmax", "none", True), ("e4m3_local", "none", True), ("awq", "none", False)],
    "mxfp4": [("minmax", "none", False), ("mx_exp", "none", False), ("mx_exp", "channel", False),
              ("mx_exp", "hessian", False), ("minmax", "none", True), ("mx_exp", "none", True), ("awq", "none", False)],
}  # "awq": the awq pass's search for each linear alone (round-to-nearest, the tensor's own global scale)


@torch.inference_mode()
def tiny_weight_errors() -> list[dict]:
    """Per random-weight tiny model and method: weight rel. error and output rel. error
    tr(E H E^T) / tr(W H W^T) with H from random tokens (the same objective family as on SmolLM2)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import tiny_model

    from quantkit.passes.gptq.solver import gptq_quantize

    rows = []
    for arch_name in TINY_ARCHS:
        torch.manual_seed(0)
        model = tiny_model(arch_name).eval()
        arch = arch_info(model)
        names = Targets().select(model, arch)
        ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
        hs: dict[str, torch.Tensor] = {}
        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, n=n: hs.__setitem__(n, hs.get(n, 0) + (lambda x: x.T @ x)(a[0].reshape(-1, a[0].shape[-1]).float())))
            for n in names]
        model(input_ids=ids, use_cache=False)
        for h in hooks:
            h.remove()
        bf16_view = SimpleNamespace(get_submodule=lambda n: SimpleNamespace(weight=model.get_submodule(n).weight.to(torch.bfloat16)))
        for fmt_name, methods in TINY_METHODS.items():
            fmt = get_format(fmt_name)
            gs = Quantize(format=fmt_name)._global_scales(bf16_view, SimpleNamespace(arch=arch), names)
            for obs, weighting, gptq in methods:
                werr = wref = oerr = oref = 0.0
                for n in names:
                    w = bf16_view.get_submodule(n).weight.detach()
                    h = hs[n]
                    if obs == "awq":
                        from quantkit.passes.awq import Awq
                        _alpha, sc, _errs = Awq(format=fmt_name).search([w], h)
                        e = (fmt.dequantize(fmt.quantize((w.double() * sc).to(w.dtype)), torch.float64) / sc
                             - w.double()).float()
                        qt = None
                    elif gptq:
                        qt, _ = gptq_quantize(fmt, w, h, gs.get(n), observer=obs)
                    else:
                        imp = None if weighting == "none" else (h.diagonal().clone() if weighting == "channel" else h)
                        qt = OBSERVERS.get(obs)(fmt, w, gs.get(n), imp)
                    if qt is not None:
                        e = fmt.dequantize(qt, torch.float32) - w.float()
                    werr += float(e.square().sum())
                    wref += float(w.float().square().sum())
                    oerr += float((e @ h * e).sum())
                    oref += float((w.float() @ h * w.float()).sum())
                rows.append({"arch": arch_name, "format": fmt_name, "observer": obs, "weighting": weighting, "gptq": gptq,
                             "weight_rel_err": (werr / wref) ** 0.5, "output_rel_err": (oerr / oref) ** 0.5})
    return rows


# -- GPTQ knobs on SmolLM2 layers: output error on development text ----------------------------
GPTQ_KNOBS = {  # format -> observers; every observer runs RTN and GPTQ x damping x act-order
    "nvfp4": ("minmax", "e4m3_local"),
    "mxfp4": ("minmax", "mx_exp"),
}
DAMPINGS = (0.01, 0.05, 0.1)


@torch.inference_mode()
def _layer_hessians(model, layers: list[int], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X [in, in] of every linear in the given decoder layers, inputs from the unquantized model."""
    arch = arch_info(model)
    names = [n for n in Targets().select(model, arch) if any(n.startswith(f"{arch.layers_path}.{i}.") for i in layers)]
    hs: dict[str, torch.Tensor] = {}
    hooks = _hessian_hooks(model, names, hs)
    try:
        for i in range(0, windows.shape[0], 4):
            model(input_ids=windows[i : i + 4], use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return hs


def gptq_knobs(layers: list[int], calib: torch.Tensor, dev: torch.Tensor, on_row=None,
               knobs: dict[str, tuple[str, ...]] | None = None) -> list[dict]:
    """Relative output error sum tr(E H_dev E^T) / sum tr(W H_dev W^T) over the layers' linears, E = Q(W) - W,
    GPTQ fed the calibration Hessians and scored on the development text's (choice on dev, as the ppl rows):
    every observer of a format as RTN and as GPTQ x damping x act-order, scored by layer_configs."""
    specs = []
    for fmt_name, observers in (knobs or GPTQ_KNOBS).items():
        specs += [f"{fmt_name}a16:{o}:none" for o in observers]
        specs += [f"{fmt_name}a16:{o}:none:gptq:damp={d}" + (":ao" if ao else "")
                  for o in observers for d in DAMPINGS for ao in (False, True)]

    def knob_rows(rows: list[dict]) -> list[dict]:
        return [{"format": SCHEMES[r["scheme"]][0], "observer": r["observer"], "gptq": r["gptq"],
                 "damp": r["damp"] if r["gptq"] else None, "act_order": r["act_order"],
                 "dev_rel_output_err": r["dev_rel_output_err"], "seconds": r["seconds"]} for r in rows]

    rows = layer_configs(layers, specs, calib, dev, on_row=(lambda rs: on_row(knob_rows(rs))) if on_row else None)
    return knob_rows(rows)


def layer_configs(layers: list[int], specs: list[str], calib: torch.Tensor, dev: torch.Tensor, on_row=None) -> list[dict]:
    """The ppl rows' weight-only specs (scheme:observer:weighting[:gptq][:ao][:damp=X][:rotN]) scored as gptq_knobs
    scores: relative output error on the development text, one layer's linears at a time. A rotation is scored in
    its own frame: with W' = W R and E' = Q(W') - W', the error E = E' R^T gives tr(E H E^T) = tr(E' R^T H R E'^T)."""
    from quantkit.passes.gptq.solver import gptq_quantize
    model, _ = load_model("smollm2-135m", dtype="float32")
    model.eval()
    h_cal, h_dev = _layer_hessians(model, layers, calib), _layer_hessians(model, layers, dev)
    arch = arch_info(model)
    rows = []
    for spec in specs:
        cfg = parse_spec(spec)
        fmt_name, act = SCHEMES[cfg["scheme"]]
        if act is not None:
            raise ValueError(f"{spec}: layer-level rows are weight-only (the activation quantizer is not modelled)")
        fmt = get_format(fmt_name)
        blk = {n: rot_block(cfg, n) for n in h_cal}
        turn = {n: (lambda h, b=b: _rotated_hessian(h, b)) if b else (lambda h: h) for n, b in blk.items()}
        weights = {n: (rotate(model.get_submodule(n).weight.detach(), blk[n]) if blk[n] else model.get_submodule(n).weight.detach())
                   .to(torch.bfloat16) for n in h_cal}  # the checkpoint's dtype, rotated before rounding as the pass does
        view = SimpleNamespace(get_submodule=lambda n: SimpleNamespace(weight=weights[n]))
        gs = Quantize(format=fmt_name)._global_scales(view, SimpleNamespace(arch=arch), list(h_cal))
        t = time.time()
        err = ref = 0.0
        for n in h_cal:
            w, hc, hd = weights[n], turn[n](h_cal[n]), turn[n](h_dev[n])
            if cfg["gptq"]:
                qt, _ = gptq_quantize(fmt, w, hc, gs.get(n), dampening=cfg["damp"], observer=cfg["observer"],
                                      act_order=cfg["act_order"], weighting=cfg["weighting"],
                                      refine_sweeps=cfg.get("cd", 0), refine_dampening=cfg.get("cdd"),
                                      refine_scale_rounds=cfg.get("cds", 0))
            else:
                imp = {"none": None, "channel": hc.diagonal().clone(), "hessian": hc}[cfg["weighting"]]
                qt = OBSERVERS.get(cfg["observer"])(fmt, w, gs.get(n), imp)
            e = fmt.dequantize(qt, torch.float32) - w.float()
            err += float((e @ hd * e).sum())
            ref += float((w.float() @ hd * w.float()).sum())
        rows.append({"config": spec, **cfg, "dev_rel_output_err": err / ref, "seconds": round(time.time() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if on_row:
            on_row(rows)
    return rows


def _write_layer_file(rows: list[dict], layers: list[int], env: dict, name: str, lines: list[str]) -> None:
    """A layer-level results file: the rows as JSON, the table lines plus the provenance footer as markdown."""
    now = os.getloadavg()
    out = {"layers": layers, "rows": rows, "environment": env | {"loadavg_now": now}}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [*lines, "", f"Commit {env['commit']} (tree dirty: {env['tree_dirty']}); command `{env['command']}`; load "
             f"average at start {env['machine']['loadavg_start']}, at write {now}."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def write_layer_configs(rows: list[dict], layers: list[int], env: dict, name: str) -> None:
    lines = [f"# Layer-level configs on SmolLM2-135M layers {layers} (all 7 linears each)", "",
             "Relative output error on the development split, sum tr(E H_dev E^T) / sum tr(W H_dev W^T), E = Q(W) - W "
             "(a rotated config: in its rotated frame, the same quantity); GPTQ and the Hessian weighting use the "
             f"{CALIB_SAMPLES} x {SEQ_LEN} calibration windows; inputs from the unquantized model. Lower is better.", "",
             "| config | scheme | observer | weighting | GPTQ | rotation | dev rel. output err | vs first row | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = rows[0]["dev_rel_output_err"]
    for r in rows:
        gptq = f"damp {r['damp']}{', act-order' if r['act_order'] else ''}" if r["gptq"] else "-"
        lines.append(f"| `{r['config']}` | {r['scheme']} | {r['observer']} | {r['weighting']} | {gptq} | "
                     f"{r['rot'] or '-'} | {r['dev_rel_output_err']:.5f} | {r['dev_rel_output_err'] / base:.3f} | {r['seconds']} |")
    _write_layer_file(rows, layers, env, name, lines)


def write_gptq(rows: list[dict], layers: list[int], env: dict, name: str) -> None:
    lines = [f"# GPTQ knobs on SmolLM2-135M layers {layers} (all 7 linears each)", "",
             "Relative output error on the development split, sum tr(E H_dev E^T) / sum tr(W H_dev W^T), E = Q(W) - W; "
             f"GPTQ Hessians from the {CALIB_SAMPLES} x {SEQ_LEN} calibration windows; inputs from the unquantized model "
             "(one layer at a time, not the sequential pipeline). Lower is better.", "",
             "| format | observer | method | damping | act-order | dev rel. output err | vs RTN, same observer | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # RTN of the same observer: what GPTQ adds on top of the observer alone
        base = next(b for b in rows if b["format"] == r["format"] and not b["gptq"] and b["observer"] == r["observer"])
        lines.append(f"| {r['format']} | {r['observer']} | {'GPTQ' if r['gptq'] else 'RTN'} | {r['damp'] or '-'} | "
                     f"{'yes' if r['act_order'] else 'no'} | {r['dev_rel_output_err']:.5f} | "
                     f"{r['dev_rel_output_err'] / base['dev_rel_output_err']:.3f} | {r['seconds']} |")
    _write_layer_file(rows, layers, env, name, lines)


# -- output -----------------------------------------------------------------------------------
def environment(argv: list[str]) -> dict:
    """bench/provenance.py's record under this bench's older key names (the merge reads them)."""
    p = provenance("bench/bench_fp4_quality.py", argv)
    return {"commit": p["commit"], "tree_dirty": p["uncommitted_changes"], "command": p["command"],
            "versions": p["versions"], "machine": {**p["machine"], "threads": torch.get_num_threads()}}


def bootstrap_delta(nll: list[float], base: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5-95% interval of Δppl over windows resampled with replacement (paired: the same windows for both)."""
    a, b = torch.tensor(nll, dtype=torch.float64), torch.tensor(base, dtype=torch.float64)
    idx = torch.randint(0, len(nll), (n, len(nll)), generator=torch.Generator().manual_seed(seed))
    d = a[idx].mean(1).exp() - b[idx].mean(1).exp()
    return float(d.quantile(0.05)), float(d.quantile(0.95))


def bootstrap_ratio(nll: list[float], peer: list[float], base: list[float], n: int = 4000,
                    seed: int = 0) -> tuple[float, float]:
    """5-95% interval of Δppl / peer's Δppl (both vs base) over held-out windows resampled with replacement,
    the same resample for all three: how firmly a goal ratio is met or missed on this many windows."""
    a, p, b = (torch.tensor(x, dtype=torch.float64) for x in (nll, peer, base))
    idx = torch.randint(0, len(nll), (n, len(nll)), generator=torch.Generator().manual_seed(seed))
    pb = b[idx].mean(1).exp()
    r = (a[idx].mean(1).exp() - pb) / (p[idx].mean(1).exp() - pb)
    return float(r.quantile(0.05)), float(r.quantile(0.95))


def _method(r: dict) -> str:
    if r.get("tool") == "llm-compressor":
        return f"llm-compressor {r['method']}"
    if r.get("recipe"):
        changes = [*r["overrides"], *(f"without {d}" for d in r["dropped"])]
        return f"`quantkit apply {r['recipe']}`" + (f" ({', '.join(changes)})" if changes else "")
    if r["config"] == "bf16":
        return "bf16"
    if r["config"] == "bf16:r1":
        return "bf16 + residual rotation"
    gptq = (f"GPTQ damp {r['damp']}" + (" act-order" if r.get("act_order") else "")) if r.get("gptq") else "RTN"
    rot = f" + {'random-sign ' if r.get('rsign') else ''}Hadamard {r['rot']}" if r.get("rot") else ""
    if r.get("ts"):
        gptq += " true-sequential"
    if r.get("aq"):
        gptq += " toward unquantized outputs"
    if r.get("cd"):
        gptq += f" + {r['cd']} CD sweeps" + (f" (damp {r['cdd']})" if r.get("cdd") is not None else "")
    if r.get("cds"):
        gptq += f" + {r['cds']} scale rounds"
    if r.get("awq"):
        gptq = f"AWQ{' duo' if r['awq'] == 'duo' else ''} scales (mean alpha {r.get('awq_alpha_mean', float('nan')):.2f}) + " + gptq
    if r.get("rotd"):
        rot += f" (down_proj {r['rotd']})"
    if r.get("r1"):
        rot = " + residual random Hadamard" + rot
    if r.get("rotsel"):
        crit = ", token-relative error" if r["rotsel"] == "norm" else ""
        rot += f" where it helps{crit} ({r.get('rotated_linears', '?')}/{r.get('n_linears', '?')} linears)"
    return f"{r['observer']} / {r['weighting']} / {gptq}{rot}"


def _label(r: dict) -> str:
    return _method(r) + (f" [calibration order {r['calib_order']}]" if r.get("calib_order") else "")


def _peer_key(r: dict) -> tuple:
    """Rows are compared with the llm-compressor rows calibrated in the same order (0: the seeded pick's)."""
    return r.get("scheme", ""), r.get("calib_order", 0)


def order_spread(rows: list[dict], peers: dict[tuple, dict]) -> list[str]:
    """With rows from more than one calibration order: each method's held-out and dev Δ per order, quantkit's ratio
    to the best llm-compressor row of the same order, and their mean, sample sd, min and max over the orders."""
    measured = [r for r in rows if r.get("tool") and "heldout_delta" in r and r["config"] != "bf16"]
    orders = sorted({r.get("calib_order", 0) for r in measured})
    if len(orders) < 2:
        return []
    lines = ["", "Calibration-order spread: the same calibration windows in another order (only the floating-point "
             "summation order differs); ratio = quantkit's held-out Δ / the best llm-compressor Δ of the same order.", "",
             "| scheme | method | " + " | ".join(f"order {o}" for o in orders) + " | mean | sd | min..max |",
             "|---|---|" + "---|" * (len(orders) + 3)]

    def line(scheme: str, what: str, vals: dict[int, float], fmt: str) -> str:
        v = list(vals.values())
        sd = f"{statistics.stdev(v):.3f}" if len(v) > 1 else "-"
        return (f"| {scheme} | {what} | " + " | ".join(f"{vals[o]:{fmt}}" if o in vals else "-" for o in orders)
                + f" | {statistics.fmean(v):{fmt}} | {sd} | {min(v):{fmt}}..{max(v):{fmt}} |")

    groups: dict[tuple, dict[int, dict]] = {}
    for r in measured:
        groups.setdefault((r["scheme"], _method(r)), {})[r.get("calib_order", 0)] = r
    for (scheme, method), by in groups.items():
        lines.append(line(scheme, f"{method}, held-out Δ", {o: r["heldout_delta"] for o, r in by.items()}, "+.3f"))
        devs = {o: r["dev_delta"] for o, r in by.items() if "dev_delta" in r}
        if len(devs) > 1:
            lines.append(line(scheme, f"{method}, dev Δ", devs, "+.3f"))
        ratios = {o: r["heldout_delta"] / peers[(scheme, o)]["best"] for o, r in by.items()
                  if r["tool"] == "quantkit" and peers.get((scheme, o), {}).get("best")}
        if ratios:
            lines.append(line(scheme, f"{method}, ÷ best llmc Δ", ratios, ".3f"))
    return lines


def write(out: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out["environment"]["machine"]["loadavg_now"] = os.getloadavg()
    rows = out["rows"]
    base = next((r for r in rows if r["config"] == "bf16"), None)
    peers: dict[tuple, dict[str, float]] = {}  # (scheme, calib order) -> {"rtn": Δ, "best": Δ, "best_method": ...}
    for r in rows:
        if base and "heldout_ppl" in r:
            r["heldout_delta"] = r["heldout_ppl"] - base["heldout_ppl"]
            if "dev_ppl" in r and "dev_ppl" in base:
                r["dev_delta"] = r["dev_ppl"] - base["dev_ppl"]
            if r["config"] != "bf16":
                r["heldout_delta_5_95"] = bootstrap_delta(r["heldout_nll"], base["heldout_nll"])
        if r.get("tool") == "llm-compressor" and "heldout_delta" in r:
            pe = peers.setdefault(_peer_key(r), {})
            if r["method"] == "rtn":
                pe["rtn"], pe["rtn_nll"] = r["heldout_delta"], r["heldout_nll"]
            if r["heldout_delta"] < pe.get("best", float("inf")):
                pe["best"], pe["best_method"], pe["best_nll"] = r["heldout_delta"], r["method"], r["heldout_nll"]
    for r in rows:  # the goal ratios' paired-bootstrap intervals (quantkit rows against this scheme's peer rows)
        pe = peers.get(_peer_key(r), {})
        if r.get("tool") == "quantkit" and "heldout_delta" in r and base:
            for k in ("rtn", "best"):
                if pe.get(k):
                    r[f"ratio_{k}_5_95"] = bootstrap_ratio(r["heldout_nll"], pe[f"{k}_nll"], base["heldout_nll"])
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# FP4 quality knobs, {out['model']} ({out['eval']})", "",
             f"Calibration: {out['calib']}. fp32 compute for every row, both tools (weights quantized from the "
             "bf16 values). Development ppl chooses; held-out ppl is reported. Δ = held-out ppl - bf16's; the 5-95% "
             "intervals (of Δ and of the ratios to llm-compressor's Δ) are paired bootstraps over the held-out "
             "windows.", "",
             "| scheme | method (observer / weighting / GPTQ) | rotation | weight rel. err | dev ppl | dev Δ | held-out ppl "
             "| held-out Δ (5-95%) | Δ / llmc RTN Δ | Δ / best llmc Δ | calib+quant s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('scheme', '-')} | {_label(r)} | - | - | - | - | did not run: {r['error'][:160]} "
                         "| - | - | - | - |")
            continue
        pe = peers.get(_peer_key(r), {})
        d = r.get("heldout_delta")
        ci = r.get("heldout_delta_5_95")
        ratio = lambda k: (f"{d / pe[k]:.2f}" + (f" ({r[f'ratio_{k}_5_95'][0]:.2f}..{r[f'ratio_{k}_5_95'][1]:.2f})"  # noqa: E731
                           if f"ratio_{k}_5_95" in r else "")) if d is not None and pe.get(k) else "-"
        cost = r.get("calib_quant_s", r.get("quantize_s", "-"))
        if "part" in r:  # a merged table: which process measured it (and any earlier rerun with the same NLLs)
            cost = f"{cost} ({r['part'].removeprefix('fp4_quality_')})" + "".join(
                f"; earlier {e['calib_quant_s']} ({e['part'].removeprefix('fp4_quality_')})" for e in r.get("earlier_runs", []))
        rcol = (f"{'random-sign ' if r.get('rsign') else ''}Hadamard {r['rot']} (online)" if r.get("rot") else
                "QuIP: random Hadamard 64 in + out" if r.get("method") == "quip_gptq" else "none")
        if r.get("r1"):
            rcol = "residual (offline)" + ("" if rcol == "none" else f" + {rcol}")
        if r.get("rotd"):
            rcol += f", down_proj {r['rotd']}"
        if r.get("orot"):
            rcol += f" + output Hadamard {r['orot']}" + (f" on {r['orot_only']}_proj" if r.get("orot_only") else "")
        lines.append(
            f"| {r.get('scheme', 'bf16')} | {_label(r)} | {rcol} | "
            f"{r['weight_rel_err']:.4f} | " if "weight_rel_err" in r else
            f"| {r.get('scheme', 'bf16')} | {_label(r)} | {rcol} | - | ")
        lines[-1] += (f"{r['dev_ppl']:.3f} | " if "dev_ppl" in r else "- | ") + \
            (f"{r['dev_delta']:+.3f} | " if "dev_delta" in r else "- | ") + \
            f"{r['heldout_ppl']:.3f} | " + (f"{d:+.3f} ({ci[0]:+.2f}..{ci[1]:+.2f})" if ci else
                                           (f"{d:+.3f}" if d is not None else "-")) + \
            f" | {ratio('rtn')} | {ratio('best')} | {cost} |"
    if peers:
        lines += ["", "llm-compressor per scheme (held-out Δ): " + "; ".join(
            f"{k[0]}{f' (calibration order {k[1]})' if k[1] else ''}: RTN {v.get('rtn', float('nan')):+.3f}, "
            f"best {v['best_method']} {v['best']:+.3f}" for k, v in peers.items())]
    lines += order_spread(rows, peers)
    if out.get("tiny") and "arch" in out["tiny"][0]:
        archs = list(dict.fromkeys(r["arch"] for r in out["tiny"]))
        lines += ["", "Random-weight tiny models (tests/tiny_models.py, hidden 64, 2 layers): weight / output "
                  "rel. error (output: sqrt(tr(E H E^T) / tr(W H W^T)), H from 8 x 64 random tokens), per method:", "",
                  "| format | method | " + " | ".join(archs) + " |", "|---|---|" + "---|" * len(archs)]
        keys = list(dict.fromkeys((r["format"], r["observer"], r["weighting"], r["gptq"]) for r in out["tiny"]))
        for k in keys:
            cells = [next(f"{r['weight_rel_err']:.4f} / {r['output_rel_err']:.4f}" for r in out["tiny"]
                          if r["arch"] == a and (r["format"], r["observer"], r["weighting"], r["gptq"]) == k) for a in archs]
            label = "minmax + AWQ scales (each linear alone)" if k[1] == "awq" else f"{k[1]} / {k[2]}"
            lines.append(f"| {k[0]} | {label}{' / GPTQ' if k[3] else ''} | " + " | ".join(cells) + " |")
    env = out["environment"]
    lines += ["", f"Commit {env['commit']} (tree dirty: {env['tree_dirty']}); command `{env['command']}`; "
              f"versions {env['versions']}; load average at start {env['machine']['loadavg_start']}, "
              f"at write {env['machine']['loadavg_now']} on {env['machine']['cpus']} CPUs (shared: wall times are "
              "not comparable between rows; quantkit's calib+quant s includes the activation-statistics sweep on the "
              f"first row of each process that needs it, stats_s={out.get('stats_s')} s here)."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


PEER_WINDOW_TOL = 1e-5  # nats per window


def peer_rows_from(stem: str, rows: list[dict]) -> list[dict]:
    """The llm-compressor rows of another result file, without their development columns, after checking that it
    scored the same held-out windows: its bf16 row's per-window NLLs equal these rows' bf16 row's within
    PEER_WINDOW_TOL (the same windows scored in another process can differ in the last fp32 bit; other windows
    differ by far more)."""
    other = json.loads((RESULTS / f"{stem}.json").read_text())["rows"]
    mine = next(r for r in rows if r["config"] == "bf16")["heldout_nll"]
    theirs = next(r for r in other if r["config"] == "bf16")["heldout_nll"]
    if len(mine) != len(theirs) or max(abs(a - b) for a, b in zip(mine, theirs)) > PEER_WINDOW_TOL:
        raise SystemExit(f"--peers-from {stem}: its held-out windows differ from these parts' (bf16 NLLs)")
    dev_keys = ("dev_nll", "dev_ppl", "dev_delta")
    return [{k: v for k, v in r.items() if k not in dev_keys} | {"part": f"{stem}, held-out only"}
            for r in other if r.get("tool") == "llm-compressor"]


def merge_rows(stems: list[str], parts: list[dict]) -> list[dict]:
    """Every part's rows, in order, each tagged with its part. A config measured again in a later part with the
    same per-window NLLs (a rerun, e.g. for a same-run timing) is one row: the later measurement, which lists
    the earlier parts' calibration + quantization times under `earlier_runs`. Different NLLs stay two rows."""
    rows: list[dict] = []
    for stem, part in zip(stems, parts):
        for r in part["rows"]:
            r = r | {"part": stem}
            same = next((i for i, q in enumerate(rows) if q["config"] == r["config"]
                         and q.get("heldout_nll") == r.get("heldout_nll") and q.get("dev_nll") == r.get("dev_nll")), None)
            if same is None:
                rows.append(r)
            else:
                old = rows[same]
                r["earlier_runs"] = [*old.get("earlier_runs", []),
                                     {"part": old["part"], "calib_quant_s": old.get("calib_quant_s", old.get("quantize_s"))}]
                rows[same] = r
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens (the first N; 0: all)")
    p.add_argument("--heldout-every", type=int, default=1, help="keep every Kth of those held-out windows (with "
                   "--windows 0 and K 4: 63 of the 252 windows, 15 of the 19 held-out articles; the first 16 are one article)")
    p.add_argument("--dev-windows", type=int, default=8, help="development windows of 512 tokens")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="bf16 or scheme:observer:weighting[:gptq][:ao][:damp=X][:rotN], ...; empty: none")
    p.add_argument("--peers", default="", help="llm-compressor rows SCHEME:method,... (rtn, rtn_mse, "
                   "rtn_expanded_mse, gptq, gptq_mse, quip_gptq)")
    p.add_argument("--no-tiny", action="store_true", help="skip the random-weight tiny-model check")
    p.add_argument("--tiny-only", action="store_true", help="only the random-weight tiny-model check")
    p.add_argument("--name", default="fp4_quality", help="results file stem under bench/results/")
    p.add_argument("--gptq-knobs", default="", help="decoder layers (e.g. 5,20): the GPTQ knob table instead of ppl rows")
    p.add_argument("--knob-set", default="", help="with --gptq-knobs: FORMAT:OBSERVER,... instead of every "
                   "format x observer of GPTQ_KNOBS (e.g. nvfp4:e4m3_local)")
    p.add_argument("--layer-configs", default="", help="with --gptq-knobs: weight-only --configs specs scored at "
                   "those layers (output error on dev text) instead of the knob grid")
    p.add_argument("--calib-order", type=int, default=0, help="0: the calibration windows in their seeded pick's order; "
                   "K > 0: the same windows permuted by seed K, for both tools (the same tokens, so the same method: "
                   "only the floating-point summation order changes)")
    p.add_argument("--merge", default="", help="stems of earlier result JSONs (same windows) to combine into --name")
    p.add_argument("--peers-from", default="", help="with --merge: a result JSON whose llm-compressor rows join the "
                   "table for the goal ratios, held-out columns only (its dev split may have other windows); its bf16 "
                   "row must have the same held-out NLLs as the merged parts'")
    args = p.parse_args(argv)
    if args.heldout_every < 1:
        p.error(f"--heldout-every must be at least 1, not {args.heldout_every}")
    if args.merge:  # processes run side by side on the shared machine, one table
        parts = [json.loads((RESULTS / f"{m}.json").read_text()) for m in args.merge.split(",")]
        out = parts[0] | {"rows": merge_rows(args.merge.split(","), parts), "merged_from": {
            m: part["environment"] for m, part in zip(args.merge.split(","), parts)}}
        out["tiny"] = next((part["tiny"] for part in parts if part.get("tiny")), [])
        out["stats_s"] = next((part["stats_s"] for part in parts if part.get("stats_s")), None)
        if args.peers_from:
            out["rows"] += peer_rows_from(args.peers_from, out["rows"])
            out["peers_from"] = args.peers_from
        write(out, args.name)
        return out
    import numpy as np

    from quantkit.eval import eval_windows

    if args.tiny_only:  # no SmolLM2 data needed
        out = {"model": "tiny random models", "eval": "weight and output error only", "calib": "-",
               "environment": environment(argv), "rows": [], "tiny": tiny_weight_errors()}
        write(out, args.name)
        return out

    model, tok = load_model("smollm2-135m", dtype="bfloat16")
    calib_texts, dev_texts = split_calib_texts()
    calib = calib_in_order(windows_of(tok, calib_texts, CALIB_SAMPLES, SEED), args.calib_order)
    if args.gptq_knobs:  # scored on its own dev windows: no held-out text needed
        del model
        layers = [int(x) for x in args.gptq_knobs.split(",")]
        env = environment(argv)
        knobs: dict[str, tuple[str, ...]] = {}
        for item in filter(None, args.knob_set.split(",")):
            f, o = item.split(":")
            knobs[f] = (*knobs.get(f, ()), o)
        if args.layer_configs:
            rows = layer_configs(layers, args.layer_configs.split(","), calib, windows_of(tok, dev_texts, 8, None),
                                 on_row=lambda rs: write_layer_configs(rs, layers, env, args.name))
            return {"rows": rows}
        rows = gptq_knobs(layers, calib, windows_of(tok, dev_texts, 8, None),
                          on_row=lambda rs: write_gptq(rs, layers, env, args.name), knobs=knobs or None)
        return {"rows": rows}
    dev = windows_of(tok, dev_texts, args.dev_windows, None)
    heldout = eval_windows(model, tok, seq_len=SEQ_LEN, max_windows=args.windows or None)  # quantkit eval's (BOS)
    n_held = heldout.shape[0]
    heldout = heldout[:: args.heldout_every].contiguous()
    del model
    WORK.mkdir(parents=True, exist_ok=True)
    files = {}
    for n, t in (("calib", calib), ("dev", dev), ("heldout", heldout)):
        files[n] = WORK / f"{args.name}_{n}_{t.shape[0]}x{SEQ_LEN}.npy"  # per run: parts run side by side
        np.save(files[n], t.numpy())
    held = f"{heldout.shape[0]} windows x {SEQ_LEN} tokens" + (
        f" (every {args.heldout_every}th of {n_held})" if args.heldout_every > 1 else "")
    out = {"model": "smollm2-135m", "eval": f"held-out split, {held}; dev split "
           f"{dev.shape[0]} windows x {SEQ_LEN} from every {DEV_EVERY}th calibration article",
           "calib": f"{CALIB_SAMPLES} x {SEQ_LEN} tokens (seed {SEED}) from the other calibration articles"
                    + (f", in permutation {args.calib_order}" if args.calib_order else ""),
           "environment": environment(argv), "rows": [], "tiny": []}
    if not args.no_tiny:
        out["tiny"] = tiny_weight_errors()
        write(out, args.name)
    cache: dict = {}
    for spec in split_specs(args.configs):
        row = run_config(spec, heldout, dev, calib, cache)
        if args.calib_order and spec != "bf16":
            row["calib_order"] = args.calib_order
        out["rows"].append(row)
        out["stats_s"] = cache.get("stats_s")
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_nll")}), flush=True)
        write(out, args.name)
    for spec in split_specs(args.peers):
        row = run_peer_config(spec, files["heldout"], files["dev"], files["calib"], args.name)
        if args.calib_order:
            row["calib_order"] = args.calib_order
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_nll")}), flush=True)
        write(out, args.name)
    return out


if __name__ == "__main__":
    main()
