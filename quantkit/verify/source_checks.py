"""--source: decompress every quantized layer and compare it with the source model's weights.

Per layer: relative Frobenius error ||W_q - W|| / ||W||, NaN/Inf in the decompressed weight, and
blocks that decompress to all zeros where the source block is not zero. A layer whose error is
far above the median of its scheme is an outlier (warning); an error no correct quantizer of that
bit width produces (a transposed or mis-scaled layer) is an error.
"""

from __future__ import annotations

import statistics

import torch

from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.config_checks import Plan
from quantkit.verify.result import VerifyResult
from quantkit.verify.source_model import SourceModel

# relative error above which a layer is wrong, not just coarse: round-to-nearest of a Gaussian row
# gives about 0.1 at 4 bits and 0.01 at 8 bits; a transposed or mis-scaled layer gives ~1 or more
REL_ERR_LIMIT = {4: 0.35, 8: 0.05}
OUTLIER_FACTOR = 3.0  # x the median relative error of the layers under the same scheme
ZERO_BLOCK = 16


def _decompress(ckpt: Checkpoint, name: str, weights: dict, out: int, inp: int) -> torch.Tensor:
    from quantkit.export.compressed_tensors import codecs
    from quantkit.export.ct_reader import weight_format
    from quantkit.formats import get_format

    fmt = weight_format(weights)
    parts = {s: ckpt.get(f"{name}.{s}") for s in ("weight", "weight_packed", "weight_scale", "weight_global_scale",
                                                   "weight_shape") if ckpt.has(f"{name}.{s}")}
    qt = codecs()[fmt].from_ct(parts, (out, inp))
    return get_format(qt.format).dequantize(qt, torch.float32)


def check_source(ckpt: Checkpoint, result: VerifyResult, plan: Plan, src: SourceModel) -> None:
    layers: dict[str, dict] = {}
    for name, gid in plan.quantized.items():
        mod, s = ckpt.modules[name], plan.schemes[gid]
        w = src.tensor(f"{name}.weight")
        if w is None:
            result.warn("source.missing", "the source has no weight for this layer", name)
            continue
        w = w.float()
        if tuple(w.shape) != (mod.out_features, mod.in_features):
            result.error("source.shape", f"source weight is {list(w.shape)}, the checkpoint's layer is "
                         f"[{mod.out_features}, {mod.in_features}]", name)
            continue
        try:
            wq = _decompress(ckpt, name, s.weights, mod.out_features, mod.in_features)
        except Exception as e:  # noqa: BLE001 - an undecodable layer is the finding
            result.error("source.decode", f"cannot decompress: {type(e).__name__}: {str(e).splitlines()[0][:160]}", name)
            continue
        bad = int((~torch.isfinite(wq)).sum())
        rel = float((wq - w).norm() / w.norm().clamp_min(1e-30))
        cols = (mod.in_features // ZERO_BLOCK) * ZERO_BLOCK
        qb = wq[:, :cols].reshape(mod.out_features, -1, ZERO_BLOCK)
        sb = w[:, :cols].reshape(mod.out_features, -1, ZERO_BLOCK)
        zero_blocks = int(((qb == 0).all(-1) & (sb != 0).any(-1)).sum())
        layers[name] = {"scheme": s.name, "rel_err": rel, "nonfinite": bad, "zeroed_blocks": zero_blocks}
        if bad:
            result.error("source.nonfinite", f"decompresses to {bad} NaN/Inf value(s)", name)
        limit = REL_ERR_LIMIT.get(int(s.weights.get("num_bits") or 8), 0.35)
        if not rel <= limit:
            result.error("source.rel_err", f"relative error {rel:.3g} against the source exceeds {limit} for "
                         f"{s.weights.get('num_bits')}-bit weights (transposed, mis-scaled or wrong source?)", name)
        if zero_blocks:
            result.warn("source.zero_blocks", f"{zero_blocks} block(s) of {ZERO_BLOCK} decompress to all zeros where "
                        "the source is not zero", name)
    _outliers(result, layers)
    _unquantized(ckpt, result, plan, src)
    if layers:
        errs = [v["rel_err"] for v in layers.values()]
        result.info["source"] = {"model": src.spec, "layers": layers, "median_rel_err": statistics.median(errs),
                                 "max_rel_err": max(errs)}


def _outliers(result: VerifyResult, layers: dict[str, dict]) -> None:
    by_scheme: dict[str, list[float]] = {}
    for v in layers.values():
        by_scheme.setdefault(v["scheme"], []).append(v["rel_err"])
    for name, v in layers.items():
        med = statistics.median(by_scheme[v["scheme"]])
        if len(by_scheme[v["scheme"]]) >= 3 and v["rel_err"] > OUTLIER_FACTOR * med:
            result.warn("source.outlier", f"relative error {v['rel_err']:.3g} is over {OUTLIER_FACTOR:g}x the median "
                        f"{med:.3g} of its scheme", name)


def _unquantized(ckpt: Checkpoint, result: VerifyResult, plan: Plan, src: SourceModel) -> None:
    """Tensors stored dense should be the source's own, up to the checkpoint's dtype."""
    prefixes = tuple(n + "." for n in plan.quantized)
    changed = []
    for key, info in ckpt.tensors.items():
        if key.startswith(prefixes) or info.dtype not in ("F32", "BF16", "F16"):
            continue
        s = src.tensor(key)
        if s is None:
            continue
        t = ckpt.get(key)
        if t.shape != s.shape or not torch.equal(t, s.to(t.dtype)):
            changed.append(key)
    if changed:
        result.warn("source.dense", f"{len(changed)} unquantized tensor(s) differ from the source, e.g. {changed[0]} "
                    "(expected only when a pass folds corrections into them)")
