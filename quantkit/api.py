"""Library entry points: apply(recipe, model) -> Report, evaluate(model) -> metrics."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.errors import CalibrationError, QualityGateError, QuantkitError, RecipeError
from quantkit.eval import eval_windows, mean_kl, perplexity
from quantkit.io import atomic_dir, atomic_write_text, check_output
from quantkit.models import load_model, resolve_device
from quantkit.nn.qlinear import QLinear
from quantkit.export.shards import DEFAULT_MAX_SHARD
from quantkit.pipeline import ProgressFactory, null_progress, run_passes
from quantkit.recipe import Recipe
from quantkit.stream import distributed
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
    config = getattr(model, "config", None)  # None: a plain nn.Module from a --loader
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise CalibrationError(f"{what} seq_len {seq_len} exceeds the model's context length {limit}")


def save_output(model: nn.Module, tokenizer, out_dir: Path, layout: str | None = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD) -> str:
    """Write a model that is entirely in memory, block by block through the one writer."""
    from quantkit.export.writer import CheckpointWriter, layout_of_model
    from quantkit.loaders import arch_for

    layout = layout or layout_of_model(model)
    ctx_arch = arch_for(model)
    writer = CheckpointWriter(out_dir, layout, max_shard_bytes)
    prefixes = [f"{ctx_arch.layers_path}.{i}" for i in range(ctx_arch.num_layers)]
    for prefix in prefixes:
        writer.add_block(prefix, model.get_submodule(prefix))
    writer.add_rest(model, prefixes)
    writer.finish(model, tokenizer)
    return layout


def apply(
    recipe: Recipe,
    model_spec: str | nn.Module | None = None,
    *,
    model: nn.Module | None = None,
    tokenizer=None,
    calib_batches=None,
    model_name: str | None = None,
    loader: str | None = None,
    output: Path | None = None,
    force: bool = False,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    max_ppl_increase: float | None = None,
    max_kl: float | None = None,
    progress: ProgressFactory = null_progress,
    execution: str | None = None,
    max_shard_size: str | int | None = None,
    offload_dir: str | Path | None = None,
) -> Report:
    """Load the model, run the recipe's passes block by block, evaluate, gate, and write the checkpoint.

    execution: "whole" (the model in memory), "streaming" (one decoder block in memory at a
    time, read from the checkpoint's shards) or "auto" (streaming when the checkpoint would not
    comfortably fit); None takes the recipe's. Both run the same block loop and write the same bytes.

    model: an nn.Module already in memory instead of a spec (whole-model execution; the tokenizer
    is optional). calib_batches: input_ids [b, s] tensors or dicts of forward kwargs that replace
    the recipe's calib data. loader: a `--loader` spec (package.module:function or
    path/to/file.py:function) that gives the model instead; it is called, with model_spec as its
    argument when one is given, after the output checks. See docs/loaders.md.
    offload_dir: streaming keeps embeddings, head and calibration states memory-mapped from files
    there (None takes the recipe's; implies streaming). See docs/streaming.md.
    """
    from quantkit.export.shards import parse_size
    from quantkit.export.writer import output_layout
    from quantkit.loaders import from_loader, in_memory
    from quantkit.stream import plan

    started = time.perf_counter()
    if loader is None:
        given, model_spec = in_memory(model_spec, model, tokenizer, calib_batches, model_name)
    elif model is not None or tokenizer is not None or calib_batches is not None:
        raise QuantkitError("apply: loader= gives the model, tokenizer and calibration batches; "
                            "model=, tokenizer= and calib_batches= do not go with it")
    saving = output is not None and recipe.output.save
    if saving and distributed.world()[0] == 0:
        check_output(Path(output), force)
    # decided before any weight loads: the layout the passes produce, and how they run
    layout = output_layout(recipe) if saving else None
    loader_seconds = 0.0
    if loader is not None:  # after the checks above, so a long load is never wasted on a refused output
        t = time.perf_counter()
        with progress(f"loader {loader}", 0):
            given, model_spec = from_loader(loader, model_spec)
        loader_seconds = time.perf_counter() - t
    max_shard = parse_size(max_shard_size if max_shard_size is not None else recipe.output.max_shard_size)
    requested = execution or recipe.execution
    model_dir = None
    if given is not None and requested == "streaming":
        raise RecipeError("execution: streaming reads the model block by block from a checkpoint on disk; a model "
                          "given in memory runs with execution: whole")
    if requested != "whole" and given is None:
        try:
            model_dir = plan.local_model_dir(model_spec)
        except QuantkitError:
            if requested == "streaming":
                raise
    mode, why = plan.choose_execution(requested, recipe.passes, model_dir)
    if given is not None:
        mode, why = "whole", "model given in memory"
    offload_root = offload_dir if offload_dir is not None else recipe.offload_dir
    if offload_root is not None:
        mode, why = plan.with_offload(requested, mode, why, recipe.passes, model_dir)
    rank, world = distributed.world()
    if world > 1 and given is not None:
        raise RecipeError("torchrun runs read the model from a checkpoint on disk; a model given in memory runs "
                          "in one process")
    if world > 1:
        distributed.check_data_free(recipe.passes)
        if model_dir is None:
            model_dir = plan.local_model_dir(model_spec)
        mode, why = "streaming", f"torch.distributed: {world} processes, blocks split by rank"
        if max_ppl_increase is not None or max_kl is not None:
            raise RecipeError("quality gates need the evaluation, which multi-process runs skip")
    report = Report(model=model_spec, recipe=recipe.name, output=None if output is None else str(output))
    report.details["execution"] = {"mode": mode, "why": why}
    seconds = report.seconds
    do_eval = (recipe.eval.enabled or max_ppl_increase is not None or max_kl is not None) and world == 1

    t = time.perf_counter()
    dev = resolve_device(device)
    if world > 1:
        distributed.init(dev)
    with progress(f"load model ({mode})", 0):
        if given is not None:
            model, tokenizer, residency = given.adopt(dtype, dev)
        else:
            model, tokenizer, residency = _load(model_spec, model_dir, mode, dtype, dev, trust_remote_code,
                                                offload_root)
    seconds["load"] = loader_seconds + time.perf_counter() - t
    report.device = str(dev)
    from quantkit.loaders import arch_for, evaluable

    arch = arch_for(model)
    for p in recipe.passes:
        p.check_model(model)  # e.g. a QuantVLA scope the model lacks fails now, before any calibration
    if do_eval and not evaluable(model, tokenizer):
        if max_ppl_increase is not None or max_kl is not None:
            raise RecipeError("quality gates need perplexity, which needs a transformers causal LM and its tokenizer")
        do_eval = False
        report.details["eval"] = {"skipped": "perplexity needs a transformers causal LM and its tokenizer"}
    calib_config = recipe.calib if given is None or given.calib is None else given.calib_config(recipe.calib)
    if calib_config is recipe.calib:
        check_context_length(model, recipe.calib.seq_len, "calibration")
    if do_eval:
        check_context_length(model, recipe.eval.seq_len, "evaluation")

    ctx = Context(model=model, tokenizer=tokenizer, arch=arch, device=dev,
                  calib_config=calib_config, batch_size=recipe.calib.batch_size, seed=recipe.calib.seed,
                  residency=residency, given_calib=None if given is None else given.calib)
    report.model_bytes_before = residency.source.total_bytes() if residency.streaming else module_bytes(model)
    stage_list = plan.stages(recipe.passes)
    one_loop = len(stage_list) == 1 and stage_list[0][0].execution == "block"

    out_ctx = atomic_dir(Path(output), force=force) if saving and rank == 0 else nullcontext(None)
    with out_ctx as tmp:
        writer = None
        if saving:
            from quantkit.export.writer import CheckpointWriter

            if world > 1:
                tmp = distributed.broadcast(tmp)  # every rank writes its shards into rank 0's temporary dir
            writer = CheckpointWriter(tmp, layout, max_shard, shard_tag=f"-r{rank}" if world > 1 else "")
        evaluation = None
        if do_eval and one_loop:
            evaluation = _side_by_side(model, tokenizer, arch, recipe, dev, report, progress)
        elif do_eval:
            t = time.perf_counter()
            report.ppl_before = _held_out_ppl(model, tokenizer, recipe.eval, progress, "evaluate original")
            reference = _topk_reference(model, tokenizer, recipe.eval) if recipe.eval.kl_samples else None
            seconds["eval_before"] = time.perf_counter() - t

        t = time.perf_counter()
        only = distributed.my_blocks(arch.num_layers) if world > 1 else None
        report.passes = run_passes(stage_list, ctx, progress, writer=writer if one_loop else None, evaluation=evaluation,
                                   only=only)
        seconds["passes"] = time.perf_counter() - t
        report.details.update(ctx.report)
        report.model_bytes_after = writer.shards.total_bytes if (residency.streaming and writer) else (
            None if residency.streaming else module_bytes(model))

        if do_eval:
            t = time.perf_counter()
            if evaluation is not None:
                with progress("evaluate (reference and quantized streams)", evaluation.n_windows) as advance:
                    result = evaluation.finish(advance)
                report.ppl_before, report.ppl_after, report.kl = result["ppl_before"], result["ppl_after"], result["kl"]
            else:
                report.ppl_after = _held_out_ppl(model, tokenizer, recipe.eval, progress, "evaluate quantized")
                if reference is not None:
                    report.kl = reference.kl(model)
            seconds["eval"] = time.perf_counter() - t

        _gates(report, max_ppl_increase, max_kl)

        if saving:
            t = time.perf_counter()
            with progress("save checkpoint", 0):
                if not one_loop:  # the passes ran as several stages on the model in memory: write it now
                    prefixes = [f"{arch.layers_path}.{i}" for i in range(arch.num_layers)]
                    for prefix in prefixes:
                        writer.add_block(prefix, model.get_submodule(prefix))
                if rank == 0:
                    writer.add_rest(model, [f"{arch.layers_path}.{i}" for i in range(arch.num_layers)])
                if world > 1:
                    parts = distributed.gather((writer.close_shards(), writer.schemes, writer.ignore, writer.modules))
                    if rank != 0:
                        return report  # rank 0 names the shards and writes the config
                    writer.merge([p[1:] for p in parts[1:]])
                    writer.finish(model, tokenizer, shard_lists=[p[0] for p in parts])
                else:
                    writer.finish(model, tokenizer)
                report.details["layout"] = layout
                report.details["verify"] = _verify_output(tmp, layout, ctx)
                atomic_write_text(tmp / "recipe.yaml", recipe.to_yaml())
                report.checkpoint_bytes = dir_bytes(tmp)
                seconds["save"] = time.perf_counter() - t
                seconds["total"] = time.perf_counter() - started
                write_report_html(report, tmp / "report.html", model=model)  # first: adds per-layer errors
                atomic_write_text(tmp / "report.json", report.to_json())
                atomic_write_text(tmp / "report.md", report.to_markdown())
    seconds["total"] = time.perf_counter() - started
    if getattr(residency, "offload", None) is not None:  # --offload-dir: its files go now (errors: at collection)
        report.details["execution"]["offload_dir"] = str(residency.offload.dir)
        residency.offload.close()
    report.model_obj = model  # for in-process callers (tests, benchmarks); not serialized
    return report


def _verify_output(path: Path, layout: str, ctx: Context) -> dict:
    """verify's cheap checks (config, tensors, shapes; no model load) before the rename."""
    if layout in ("dense", "bnb-int8"):
        return {"skipped": f"{layout} checkpoint"}
    from quantkit.errors import CheckpointCheckError
    from quantkit.verify import verify_checkpoint

    head = any(n == "lm_head" or n.endswith(".lm_head") for n in ctx.quantized)
    result = verify_checkpoint(path, cheap=True, run=False, allow_quantized_lm_head=head)
    if result.errors:
        first = result.errors[0]
        where = f" ({first.module})" if first.module else ""
        if all(e.check.startswith("shapes.") for e in result.errors):  # the model's shapes, not a bug
            raise QuantkitError(f"this model's layer shapes do not fit the recipe's scheme{where}: {first.message}; "
                                "nothing was written")
        raise CheckpointCheckError(
            f"internal error: the checkpoint failed verify's {first.check} check{where}: {first.message}; "
            f"nothing was written ({len(result.errors)} error(s); please report this)"
        )
    return {"errors": 0, "warnings": len(result.warnings)}


def _load(spec: str, model_dir: Path | None, mode: str, dtype: str, dev: torch.device, trust_remote_code: bool,
          offload_root: str | Path | None = None):
    """-> (model, tokenizer, residency)."""
    from quantkit.stream.residency import StreamResidency, WholeResidency, build_skeleton
    from quantkit.stream.source import SafetensorsSource

    if mode == "whole":
        model, tok = load_model(spec, dtype=dtype, device=str(dev), trust_remote_code=trust_remote_code)
        return model, tok, WholeResidency(model)
    from transformers import AutoTokenizer

    from quantkit.models import resolve_dtype

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    want = resolve_dtype(dtype)
    model = build_skeleton(model_dir, want, trust_remote_code)
    arch = arch_info(model)
    prefixes = [f"{arch.layers_path}.{i}" for i in range(arch.num_layers)]
    from quantkit.stream.offload import OffloadStore

    offload = OffloadStore(offload_root) if offload_root is not None else None
    residency = StreamResidency(model, SafetensorsSource(model_dir), prefixes, dev, offload)
    residency.load_resident()
    return model, tok, residency


def _side_by_side(model, tokenizer, arch, recipe: Recipe, dev, report: Report, progress: ProgressFactory):
    from quantkit.stream.evaluation import SideBySide, compute_dtype_for, window_count

    ev = recipe.eval
    n_params = sum(p.numel() for p in model.parameters())
    n = window_count(ev, n_params)
    windows = eval_windows(model, tokenizer, seq_len=ev.seq_len, max_windows=n)
    flops = 2 * 2 * n_params * windows.numel()  # two streams, 2 FLOP per parameter per token
    dtype = compute_dtype_for(ev.compute_dtype, next(model.parameters()).dtype, dev)
    report.details["eval_plan"] = {"windows": int(windows.shape[0]), "seq_len": ev.seq_len,
                                   "approx_tflop": round(flops / 1e12, 2), "kl": bool(ev.kl_samples),
                                   "compute_dtype": str(dtype).removeprefix("torch.")}
    with progress(f"evaluation: {windows.shape[0]} held-out windows x {ev.seq_len} tokens, two streams, "
                  f"~{flops / 1e12:.1f} TFLOP in {str(dtype).removeprefix('torch.')}", 0):
        ev_obj = SideBySide(model, list(arch.layers(model)), windows, recipe.calib.batch_size, dev,
                            kl=bool(ev.kl_samples), compute_dtype=dtype)
    ev_obj.n_windows = int(windows.shape[0])
    return ev_obj


def _held_out_ppl(model: nn.Module, tokenizer, ev, progress: ProgressFactory, label: str) -> float:
    n_windows = len(eval_windows(model, tokenizer, seq_len=ev.seq_len, max_windows=ev.max_windows))
    with progress(label, n_windows) as advance:
        return perplexity(model, tokenizer, seq_len=ev.seq_len, max_windows=ev.max_windows, progress=advance)


def _topk_reference(model: nn.Module, tokenizer, ev):
    from quantkit.stream.evaluation import TopKReference

    windows = eval_windows(model, tokenizer, seq_len=ev.seq_len, max_windows=ev.kl_samples)
    return TopKReference(model, windows)


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


def load_for_eval(model_spec: str, runtime: str = "transformers", *, device: str = "cpu", dtype: str = "auto",
                  trust_remote_code: bool = False):
    """(model, tokenizer) as `quantkit eval` scores it: runtime "transformers" (its loader,
    decompressing a quantized checkpoint) or "quantkit" (a compressed-tensors checkpoint read into
    quantkit's real-quant modules: the codes on disk, packed in memory)."""
    import quantkit.hf_integration  # noqa: F401  (quantkit-layout checkpoints load after this import)

    if runtime == "transformers":
        return load_model(model_spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if runtime != "quantkit":
        raise QuantkitError(f"unknown runtime {runtime!r}; known: transformers, quantkit")
    from transformers import AutoTokenizer

    from quantkit.export.ct_reader import load_ct_checkpoint
    from quantkit.models import resolve_dtype

    target = Path(model_spec)
    if not (target / "config.json").exists():
        raise QuantkitError(f"--runtime quantkit needs a checkpoint directory; {model_spec} is not one")
    want = resolve_dtype(dtype)
    model = load_ct_checkpoint(target, torch.bfloat16 if want == "auto" else want).to(resolve_device(device))
    return model, AutoTokenizer.from_pretrained(target)


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
    with progress("load model", 0):
        model, tok = load_for_eval(model_spec, runtime, device=device, dtype=dtype,
                                   trust_remote_code=trust_remote_code)
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
