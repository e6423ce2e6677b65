""""It runs": the checkpoint loads in transformers and one short forward gives finite logits in the
declared dtype; for compressed-tensors, quantkit's own runtime gives the same logits.

"The same" is measured against the checkpoint's exact arithmetic: transformers' forward of the
same dequantized weights in fp32 (fp32_reference.py). transformers in the declared dtype is
itself some distance from it (bf16 rounding, compounding through depth; on SmolLM2-135M int8
weights, 0.036 of the largest logit, KL 0.0019); that distance is the noise floor, measured on
every run. quantkit's runtime passes when it is within NOISE_FACTOR times the floor:

    KL(fp32 || quantkit) <= max(KL_FLOOR, NOISE_FACTOR * KL(fp32 || transformers))
    max|quantkit - transformers| / max|transformers| <= max(RUNTIME_RTOL, NOISE_FACTOR * same for transformers vs fp32)

Measured on SmolLM2-135M (docs/verify.md): correct checkpoints of five recipes, quantkit 0.9-1.6x
the floor's KL; int8-w8a16 with one down_proj's scale x1.5 in quantkit's runtime, 10.6x (layer 16)
to 480x (layer 29). Quantized activations round their codes differently in every arithmetic, so
their floor is large (SmolLM2: W8A8 KL 0.09, NVFP4 W4A4 0.38) and the bound loose there. Dynamic
per-token int8 activations (W8A8, W4A8): the KL bound never drops below DYNAMIC_INT_KL_TOL and the
max-difference bound is not applied.

The forward reads a fixed English sentence through the checkpoint's tokenizer when it has one,
otherwise N_TOKENS seeded random ids.
"""

from __future__ import annotations

import warnings

import torch

from quantkit.errors import ModelLoadError
from quantkit.eval import kl_sum
from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.fp32_reference import fp32_forward
from quantkit.verify.result import VerifyResult

RUNTIME_RTOL = 2e-2  # max |logit difference| / max |logit|, quantkit vs transformers, when the floor is below it
# quantkit's runtime may be this many times further from the fp32 forward than transformers is:
# measured 0.9-1.6x for correct checkpoints (SmolLM2, five recipes); >= 10x (KL) for one layer's scale x1.5
NOISE_FACTOR = 3.0
KL_FLOOR = 1e-6  # nats: fp32 checkpoints (no floor to measure); a x1.5 layer scale on a tiny Llama costs >= 4e-5
DYNAMIC_INT_KL_TOL = 0.25  # nats: the KL bound's floor with dynamic int8 activations (SmolLM2 W8A8: 0.12)
N_TOKENS = 16
TEXT = ("The quick brown fox jumps over the lazy dog. A checkpoint that loads but is subtly wrong is the "
        "worst failure a quantization tool can have.")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _tokens(ckpt: Checkpoint) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(ckpt.path)(TEXT, return_tensors="pt")["input_ids"]
        if ids.numel() >= 4:
            return ids
    except Exception:  # noqa: BLE001 - no tokenizer saved with the checkpoint: random ids serve as well
        pass
    vocab = int(ckpt.text_config().get("vocab_size") or 256)
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, max(2, vocab), (1, N_TOKENS), generator=g)


def load_in_transformers(ckpt: Checkpoint):
    """-> (model, None), or (None, the first line of why it does not load)."""
    from transformers import AutoModelForCausalLM

    # quant_method "quantkit" loads because importing quantkit registers it with transformers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(ckpt.path, dtype="auto").eval(), None
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return None, first_line(e)


def apply_online_transforms(ckpt: Checkpoint, model) -> int:
    """Apply the checkpoint's online transforms to a model transformers loaded; -> how many schemes.

    transformers' from_pretrained ignores `transform_config` (docs/rotation.md), so a checkpoint with online
    rotations runs wrong there. vLLM applies them: the offline parts (location weight_*) are already in the
    stored weights and only the online ones (input, output, ...) run. This does the same with
    compressed-tensors' own apply_transform_config, an implementation independent of quantkit's runtime,
    then loads each transform matrix the checkpoint stores (a randomized Hadamard's signs live only there).
    """
    from quantkit.verify.transform_checks import ONLINE

    raw = ckpt.qc.get("transform_config") or {}
    groups = {}
    for name, scheme in (raw.get("config_groups") or {}).items():
        online = [a for a in scheme.get("apply", []) if a.get("location") in ONLINE]
        if online:
            groups[name] = {**scheme, "apply": online}
    if not groups:
        return 0
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    apply_transform_config(model, TransformConfig.model_validate({"config_groups": groups}))
    # compressed-tensors registers each as submodule <linear>.<scheme>_<location> (transform_checks.py)
    submodules = {f"{g}_{a['location']}" for g, scheme in groups.items() for a in scheme["apply"]}
    for name, module in model.named_modules():
        key, t = f"{name}.weight", getattr(module, "weight", None)
        if not (name.rsplit(".", 1)[-1] in submodules and isinstance(t, torch.Tensor) and ckpt.has(key)):
            continue
        stored = ckpt.get(key)
        if stored.shape != t.shape:
            raise ModelLoadError(f"transform tensor {key} is {tuple(stored.shape)} in the checkpoint, "
                                 f"compressed-tensors builds {tuple(t.shape)}")
        if not torch.equal(stored.to(t.dtype), t):  # compressed-tensors shares one matrix per size: unshare it
            module.weight = torch.nn.Parameter(stored.to(t.dtype), requires_grad=False)
    return len(groups)


def check_forward(ckpt: Checkpoint, result: VerifyResult,
                  model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """The loaded checkpoint's forward on a short input -> (ids, logits, the same forward in fp32)
    when it gives finite logits; the fp32 logits are None when that forward fails."""
    ids = _tokens(ckpt)
    declared = ckpt.declared_dtype
    try:
        with torch.inference_mode():
            logits = model(ids).logits
    except Exception as e:  # noqa: BLE001
        result.error("run.forward", f"loads in transformers but a forward fails: {first_line(e)}")
        return None
    run: dict = {"tokens": int(ids.shape[1]), "logits_dtype": str(logits.dtype).removeprefix("torch.")}
    result.info["run"] = run
    if not torch.isfinite(logits).all():
        result.error("run.finite", f"transformers forward gives {int((~torch.isfinite(logits)).sum())} non-finite logits")
        return None
    if declared and run["logits_dtype"] != declared:
        result.error("run.dtype", f"config declares {declared} but transformers runs it in {run['logits_dtype']}")
    return ids, logits, _fp32_logits(model, ids, logits)


def _fp32_logits(model, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
    """The same forward in fp32 (on the same load: every module widened only while it runs)."""
    if logits.dtype == torch.float32:
        return logits
    try:
        with torch.inference_mode(), fp32_forward(model):
            ref = model(ids).logits.float()
    except Exception:  # noqa: BLE001 - a model whose forward mixes dtypes: the fixed tolerances apply
        return None
    return ref if torch.isfinite(ref).all() else None


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean token KL(p || q) in nats (quantkit.eval's KL, per position)."""
    return kl_sum(p_logits, q_logits) / (p_logits.numel() // p_logits.shape[-1])


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check_runtime(ckpt: Checkpoint, result: VerifyResult, ids: torch.Tensor, logits: torch.Tensor,
                  fp32: torch.Tensor | None, dynamic_int_acts: bool = False) -> None:
    """quantkit's own runtime on the ids transformers gave `logits` (and, in fp32, `fp32`) for
    (compressed-tensors only)."""
    if ckpt.quant_method != "compressed-tensors":
        return
    from quantkit.export.ct_reader import load_ct_checkpoint

    try:
        ours = load_ct_checkpoint(ckpt.path, dtype=logits.dtype)
    except ModelLoadError as e:
        # a scheme quantkit's runtime does not implement is quantkit's gap, not the checkpoint's
        result.warn("run.runtime", f"not compared with quantkit's runtime: {first_line(e)}")
        return
    try:
        with torch.inference_mode():
            ours_logits = ours(ids).logits
    except Exception as e:  # noqa: BLE001
        result.error("run.runtime", f"quantkit's runtime fails on it: {first_line(e)}")
        return
    ref, got = logits.float(), ours_logits.float()
    delta = _rel(got, ref)
    run = result.info["run"]
    run.update(runtime_rel_max_diff=delta, runtime_kl=_kl(ref, got),
               runtime_top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).float().mean()))
    # the floor: how far transformers itself is from the exact (fp32) forward; none when the
    # fp32 forward failed, and 0 for an fp32 checkpoint
    floor_rel = floor_kl = 0.0
    if fp32 is not None:
        floor_rel, floor_kl = _rel(ref, fp32), _kl(fp32, ref)
        run["fp32_reference"] = {"transformers_rel_max_diff": floor_rel, "transformers_kl": floor_kl,
                                 "quantkit_rel_max_diff": _rel(got, fp32), "quantkit_kl": _kl(fp32, got)}
    kl_tol = max(DYNAMIC_INT_KL_TOL if dynamic_int_acts else KL_FLOOR, NOISE_FACTOR * floor_kl)
    # without the fp32 forward, KL is measured against transformers, as before the floor existed
    kl = _kl(fp32, got) if fp32 is not None else run["runtime_kl"]
    tolerance = {"kl_vs_fp32" if fp32 is not None else "kl": kl_tol}
    failed = [] if kl <= kl_tol else [f"mean token KL {kl:.3g} from the fp32 forward (tolerance {kl_tol:.3g})"]
    if not dynamic_int_acts:
        rel_tol = max(RUNTIME_RTOL, NOISE_FACTOR * floor_rel)
        tolerance["rel_max_diff"] = rel_tol
        if not delta <= rel_tol:
            failed.append(f"max logit difference {delta:.3g} of the largest logit (tolerance {rel_tol:.3g})")
    run["runtime_tolerance"] = tolerance
    if failed:
        floor = (f"; transformers in {logits.dtype} vs fp32: KL {floor_kl:.3g}, max difference {floor_rel:.3g}"
                 if fp32 is not None else "")
        result.error("run.runtime", "quantkit's runtime and transformers disagree: " + ", ".join(failed) + floor)
