"""Library entry points: apply(recipe, model) -> Report, evaluate(model) -> metrics."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from quantkit.arch import arch_info
from quantkit.calib import load_calib
from quantkit.context import Context
from quantkit.errors import CalibrationError, QualityGateError, QuantkitError
from quantkit.eval import eval_windows, mean_kl, perplexity
from quantkit.io import atomic_dir, atomic_write_text, check_output
from quantkit.models import load_model, resolve_device
from quantkit.nn.qlinear import QLinear
from quantkit.pipeline import ProgressFactory, null_progress, run_passes
from quantkit.recipe import Recipe
from quantkit.report import Report, write_report_html


def module_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (tied tensors once), plus fake-quant dense caches."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, QLinear) and m._dense is not None:
            total += m._dense.numel() * m._dense.element_size()
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def check_context_length(model: nn.Module, seq_len: int, what: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise CalibrationError(f"{what} seq_len {seq_len} exceeds the model's context length {limit}")


def save_output(model: nn.Module, tokenizer, out_dir: Path) -> str:
    """Write the checkpoint in the layout its modules need; returns the layout name."""
    import importlib

    from quantkit import hf_integration
    from quantkit.export import quantkit_layout
    from quantkit.export.compressed_tensors import save_checkpoint

    for handler_module in hf_integration.HANDLER_MODULES:  # every layout type must be known to the writer
        importlib.import_module(handler_module)

    if quantkit_layout.has_quantkit_modules(model):
        if any(isinstance(m, QLinear) for m in model.modules()):
            raise QuantkitError(
                "this model mixes compressed-tensors layers with quantkit-only layers; one checkpoint "
                "cannot hold both yet (run the quantkit-only pass alone, or disable saving)"
            )
        quantkit_layout.save_quantkit_checkpoint(model, out_dir)
        layout = "quantkit"
    elif any(isinstance(m, QLinear) for m in model.modules()):
        save_checkpoint(model, out_dir)
        layout = "compressed-tensors"
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
        layout = "dense"
    tokenizer.save_pretrained(out_dir)
    return layout


def apply(
    recipe: Recipe,
    model_spec: str,
    *,
    output: Path | None = None,
    force: bool = False,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    max_ppl_increase: float | None = None,
    max_kl: float | None = None,
    progress: ProgressFactory = null_progress,
) -> Report:
    """Load the model, run the recipe's passes, evaluate, gate, and write the checkpoint."""
    started = time.perf_counter()
    if output is not None and recipe.output.save:
        check_output(Path(output), force)
    report = Report(model=model_spec, recipe=recipe.name, output=None if output is None else str(output))
    seconds = report.seconds
    do_eval = recipe.eval.enabled or max_ppl_increase is not None or max_kl is not None

    t = time.perf_counter()
    with progress("load model", 0):
        model, tokenizer = load_model(model_spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    seconds["load"] = time.perf_counter() - t
    report.device = str(resolve_device(device))
    arch = arch_info(model)
    check_context_length(model, recipe.calib.seq_len, "calibration")
    if do_eval:
        check_context_length(model, recipe.eval.seq_len, "evaluation")

    ctx = Context(model=model, tokenizer=tokenizer, arch=arch, device=resolve_device(device),
                  calib_config=recipe.calib, batch_size=recipe.calib.batch_size, seed=recipe.calib.seed)
    report.model_bytes_before = module_bytes(model)
    ev = recipe.eval
    if do_eval:
        t = time.perf_counter()
        report.ppl_before = _held_out_ppl(model, tokenizer, ev, progress, "evaluate original")
        if ev.kl_samples:
            ctx.keep_teacher()
        seconds["eval_before"] = time.perf_counter() - t

    t = time.perf_counter()
    report.passes = run_passes_keep_teacher(recipe, ctx, progress)
    seconds["passes"] = time.perf_counter() - t
    report.details = ctx.report
    report.model_bytes_after = module_bytes(model)

    if do_eval:
        t = time.perf_counter()
        report.ppl_after = _held_out_ppl(model, tokenizer, ev, progress, "evaluate quantized")
        if ev.kl_samples and ctx.teacher is not None:
            kl_ids = ctx.calib if ctx.calib is not None else load_calib(
                tokenizer, source=recipe.calib.source, n_samples=ev.kl_samples, seq_len=recipe.calib.seq_len,
                seed=recipe.calib.seed)
            kl_ids = kl_ids[: ev.kl_samples]
            batches = [kl_ids[i : i + recipe.calib.batch_size] for i in range(0, len(kl_ids), recipe.calib.batch_size)]
            with progress("KL vs original", len(kl_ids)) as advance:
                report.kl = mean_kl(model, ctx.teacher, batches, progress=advance)
        ctx.teacher = None
        seconds["eval_after"] = time.perf_counter() - t

    _gates(report, max_ppl_increase, max_kl)

    if output is not None and recipe.output.save:
        t = time.perf_counter()
        with progress("save checkpoint", 0), atomic_dir(Path(output), force=force) as tmp:
            report.details["layout"] = save_output(model, tokenizer, tmp)
            atomic_write_text(tmp / "recipe.yaml", recipe.to_yaml())
            report.checkpoint_bytes = dir_bytes(tmp)
            seconds["save"] = time.perf_counter() - t
            seconds["total"] = time.perf_counter() - started
            write_report_html(report, tmp / "report.html", model=model)  # first: adds per-layer errors
            atomic_write_text(tmp / "report.json", report.to_json())
            atomic_write_text(tmp / "report.md", report.to_markdown())
    seconds["total"] = time.perf_counter() - started
    report.model_obj = model  # for in-process callers (tests, benchmarks); not serialized
    return report


def _held_out_ppl(model: nn.Module, tokenizer, ev, progress: ProgressFactory, label: str) -> float:
    n_windows = len(eval_windows(model, tokenizer, seq_len=ev.seq_len, max_windows=ev.max_windows))
    with progress(label, n_windows) as advance:
        return perplexity(model, tokenizer, seq_len=ev.seq_len, max_windows=ev.max_windows, progress=advance)


def run_passes_keep_teacher(recipe: Recipe, ctx: Context, progress: ProgressFactory) -> list[dict]:
    teacher = ctx.teacher
    rows = run_passes(recipe.passes, ctx, progress)
    if ctx.teacher is None and teacher is not None:
        ctx.teacher = teacher  # run_passes frees its own snapshot; keep the eval reference
    return rows


def _gates(report: Report, max_ppl_increase: float | None, max_kl: float | None) -> None:
    failures = []
    if max_ppl_increase is not None:
        value = report.ppl_increase_pct
        ok = value is not None and value <= max_ppl_increase
        report.gates.append({"gate": "max_ppl_increase_pct", "limit": max_ppl_increase, "value": value, "ok": ok})
        if not ok:
            failures.append(f"perplexity rose {value:.2f}% (limit {max_ppl_increase}%)")
    if max_kl is not None:
        value = report.kl
        ok = value is not None and value <= max_kl
        report.gates.append({"gate": "max_kl", "limit": max_kl, "value": value if value is not None else float("nan"),
                             "ok": ok})
        if not ok:
            failures.append(f"mean token KL {value} exceeds {max_kl}" if value is not None else
                            "mean token KL was not measured (eval.kl_samples is 0)")
    if failures:
        err = QualityGateError("quality gate failed: " + "; ".join(failures) + "; no checkpoint written")
        err.report = report
        raise err


@torch.inference_mode()
def evaluate(
    model_spec: str,
    *,
    reference: str | None = None,
    data: str = "default",
    seq_len: int = 512,
    max_windows: int | None = 64,
    kl_samples: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    runtime: str = "transformers",
    progress: ProgressFactory = null_progress,
) -> dict:
    """Perplexity on held-out text, and mean token KL against a reference model if given.

    runtime "quantkit" reads a compressed-tensors checkpoint into quantkit's real-quant modules
    (the codes on disk, packed in memory) instead of transformers' decompressing loader.
    """
    import quantkit.hf_integration  # noqa: F401  (quantkit-layout checkpoints load after this import)

    with progress("load model", 0):
        if runtime == "quantkit":
            from transformers import AutoTokenizer

            from quantkit.export.ct_reader import load_ct_checkpoint
            from quantkit.models import resolve_dtype

            target = Path(model_spec)
            if not (target / "config.json").exists():
                raise QuantkitError(f"--runtime quantkit needs a checkpoint directory; {model_spec} is not one")
            want = resolve_dtype(dtype)
            model = load_ct_checkpoint(target, torch.bfloat16 if want == "auto" else want).to(resolve_device(device))
            tok = AutoTokenizer.from_pretrained(target)
        elif runtime == "transformers":
            model, tok = load_model(model_spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        else:
            raise QuantkitError(f"unknown runtime {runtime!r}; known: transformers, quantkit")
    check_context_length(model, seq_len, "evaluation")
    result: dict = {"model": model_spec, "runtime": runtime, "data": data, "seq_len": seq_len}
    n = len(eval_windows(model, tok, source=data, seq_len=seq_len, max_windows=max_windows))
    result["windows"] = n
    with progress("perplexity", n) as advance:
        result["ppl"] = perplexity(model, tok, data, seq_len=seq_len, max_windows=max_windows, progress=advance)
    if reference is not None:
        with progress("load reference", 0):
            ref, _ = load_model(reference, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        with progress("reference perplexity", n) as advance:
            result["reference_ppl"] = perplexity(ref, tok, data, seq_len=seq_len, max_windows=max_windows,
                                                 progress=advance)
        windows = eval_windows(model, tok, source=data, seq_len=seq_len, max_windows=kl_samples)
        batches = [windows[i : i + 4] for i in range(0, len(windows), 4)]
        with progress("KL vs reference", len(windows)) as advance:
            result["kl"] = mean_kl(model, ref, batches, progress=advance)
    return result
