"""The typer CLI: the only module (with the cli_* command modules) that prints or exits.

Exit codes: 0 ok, 1 a quality gate failed, 2 usage or input error, 3 internal error.
Streams and the --json envelope: see quantkit.cli_common and docs/cli.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli_common import (DebugOpt, DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, OutputDirOpt, SetOpt,
                                 State, TrustOpt, err_console, error_boundary, json_envelope, make_progress,
                                 print_json, quiet_libraries)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization and compression of Hugging Face models.")

RecipeArg = Annotated[str, typer.Argument(help="recipe YAML file, or the name of a shipped recipe (see `quantkit recipes`)")]


@app.callback()
def main_callback(debug: DebugOpt = False) -> None:
    State.debug = debug
    quiet_libraries()


@app.command()
def apply(
    recipe: RecipeArg,
    model: Annotated[Optional[str], typer.Argument(help="hub id, local directory, GGUF file, or alias smollm2-135m; with --loader, passed to the loader function (optional)", show_default=False)] = None,
    output: OutputDirOpt = None,
    set_: SetOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
    max_ppl_increase: Annotated[Optional[float], typer.Option("--max-ppl-increase", help="fail (exit 1) if perplexity rises more than PCT percent")] = None,
    max_kl: Annotated[Optional[float], typer.Option("--max-kl", help="fail (exit 1) if mean token KL exceeds X")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="skip perplexity/KL evaluation")] = False,
    execution: Annotated[Optional[str], typer.Option("--execution", help="auto (default: streaming when the model would not comfortably fit in memory), whole, or streaming (one decoder block in memory at a time)")] = None,
    max_shard_size: Annotated[Optional[str], typer.Option("--max-shard-size", help="largest output shard, e.g. 5GB (default) or 500MB")] = None,
    offload_dir: Annotated[Optional[Path], typer.Option("--offload-dir", help="streaming with host RAM short too: keep embeddings, head and calibration states memory-mapped from files in DIR (implies --execution streaming)")] = None,
    layout: Annotated[Optional[str], typer.Option("--layout", help="checkpoint layout: auto (what the passes need) or bnb-int8 (bitsandbytes LLM.int8, with the llm-int8 recipe); sets the recipe's output.layout")] = None,
    loader: Annotated[Optional[str], typer.Option("--loader", help="package.module:function or path/to/file.py:function returning the model (or model, tokenizer, calibration batches); see docs/loaders.md")] = None,
) -> None:
    """Quantize MODEL with RECIPE and write a checkpoint plus report."""
    with error_boundary(as_json) as result:
        from quantkit import api
        from quantkit.errors import QuantkitError
        from quantkit.recipe import load_recipe

        overrides = list(set_ or [])
        if no_eval:
            overrides.append("eval.enabled=false")
        if execution is not None:
            overrides.append(f"execution={execution}")
        if max_shard_size is not None:
            overrides.append(f"output.max_shard_size={max_shard_size}")
        if offload_dir is not None:
            overrides.append(f"offload_dir={offload_dir}")
        if layout is not None:
            overrides.append(f"output.layout={layout}")
        rec = load_recipe(recipe, overrides)
        if model is None and loader is None:
            raise QuantkitError("apply needs a MODEL argument or --loader package.module:function")
        if output is None:
            stem = Path(model).name if model is not None else loader.rpartition(":")[2]
            output = Path("out") / f"{stem}-{rec.name}"
        progress, factory = make_progress()
        with progress:
            report = api.apply(rec, model, loader=loader, output=output, force=force, device=device, dtype=dtype,
                               trust_remote_code=trust_remote_code, max_ppl_increase=max_ppl_increase,
                               max_kl=max_kl, progress=factory)
        _print_summary(report)
        result.report = report.to_dict()


def _print_summary(report) -> None:
    from rich.table import Table

    table = Table(title=f"quantkit apply: {report.recipe} on {report.model}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for row in report.summary_rows():
        table.add_row(*row)
    err_console.print(table)
    if report.output:
        err_console.print(f"wrote {report.output}", highlight=False)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="model or quantized checkpoint")],
    reference: Annotated[Optional[str], typer.Option("--reference", help="reference model for mean token KL")] = None,
    data: Annotated[str, typer.Option("--data", help="evaluation text: 'default' (held-out Wikipedia) or a .txt/.jsonl/.parquet file")] = "default",
    seq_len: Annotated[int, typer.Option("--seq-len", help="tokens per perplexity window")] = 512,
    max_windows: Annotated[int, typer.Option("--max-windows", help="windows of seq-len tokens (0 = all)")] = 64,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="lm-evaluation-harness tasks, comma separated (needs the lm-eval extra); replaces perplexity")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="lm-eval: documents per task (default: all)")] = None,
    task_dir: Annotated[Optional[list[Path]], typer.Option("--task-dir", help="lm-eval: a folder of task YAML files (repeatable), for local tasks")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="lm-eval: few-shot examples per prompt (default: the task's)")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="lm-eval: requests per forward")] = 1,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
    runtime: Annotated[str, typer.Option("--runtime", help="transformers (decompressing loader) or quantkit (real-quant modules, compressed-tensors checkpoints)")] = "transformers",
) -> None:
    """Perplexity on held-out text and mean token KL against --reference, or lm-eval --tasks."""
    with error_boundary(as_json) as result:
        from quantkit import api

        progress, factory = make_progress()
        if tasks is not None:
            from quantkit.integrations.lm_eval import run_tasks

            with progress:
                out = run_tasks(model, tasks, limit=limit, include_paths=list(task_dir or []),
                                num_fewshot=num_fewshot, batch_size=batch_size, device=device, dtype=dtype,
                                runtime=runtime, trust_remote_code=trust_remote_code, progress=factory)
            _print_task_table(model, out)
            result.report = out
            return
        with progress:
            out = api.evaluate(model, reference=reference, data=data, seq_len=seq_len,
                               max_windows=max_windows or None, device=device, dtype=dtype,
                               trust_remote_code=trust_remote_code, runtime=runtime, progress=factory)
        from rich.table import Table

        table = Table(title=f"quantkit eval: {model}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in out.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        err_console.print(table)
        result.report = out


def _print_task_table(model: str, out: dict) -> None:
    from rich.table import Table

    table = Table(title=f"quantkit eval: {model} (lm-eval)")
    for col in ("task", "metric", "value"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for task, metrics in out["results"].items():
        for name, value in metrics.items():
            table.add_row(task, name, f"{value:.4f}" if isinstance(value, float) else str(value))
    err_console.print(table)


@app.command()
def validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a recipe (fields, values, pass order) without loading a model."""
    with error_boundary(as_json) as result:
        from quantkit.recipe import load_recipe

        rec = load_recipe(recipe, list(set_ or []))
        result.report = rec.to_dict()
        err_console.print(f"[green]ok[/green]: {recipe} ({rec.name}, {len(rec.passes)} passes)", highlight=False)


@app.command()
def recipes(as_json: JsonOpt = False) -> None:
    """List the shipped recipes."""
    with error_boundary(as_json) as result:
        import yaml

        from quantkit.paths import recipes_dir

        rows = []
        for path in sorted(recipes_dir().glob("*.yaml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            rows.append({"name": path.stem, "description": data.get("description", "")})
        result.report = rows
        if not as_json:
            _table_to_stdout("shipped recipes", ("name", "description"), [(r["name"], r["description"]) for r in rows])


@app.command()
def formats(as_json: JsonOpt = False) -> None:
    """List the number formats."""
    with error_boundary(as_json) as result:
        from quantkit.formats import FORMATS

        rows = [{"name": n, "bits_per_weight": f.bits, "doc": (type(f).__doc__ or "").strip().splitlines()[0]}
                for n, f in FORMATS.items()]
        result.report = rows
        if not as_json:
            _table_to_stdout("formats", ("name", "bits/weight", "description"),
                             [(r["name"], f"{r['bits_per_weight']:.3g}", r["doc"]) for r in rows])


@app.command()
def passes(as_json: JsonOpt = False) -> None:
    """List the passes with their fields, types and defaults."""
    with error_boundary(as_json) as result:
        from quantkit.cli_types import type_name
        from quantkit.passes import PASSES

        rows = []
        for name, cls in PASSES.items():
            fields = {}
            for fname, info in cls.model_fields.items():
                default = None if info.is_required() else info.get_default(call_default_factory=True)
                if hasattr(default, "model_dump"):
                    default = default.model_dump()
                fields[fname] = {"type": type_name(info.annotation), "required": info.is_required(),
                                 "default": default}
            rows.append({"name": name, "summary": cls.summary, "requires": sorted(cls.requires),
                         "provides": sorted(cls.provides), "fields": fields})
        result.report = rows
        if not as_json:
            table_rows = []
            for r in rows:
                fields = "\n".join(f"{k}: {v['type']}" + (" (required)" if v["required"] else f" = {v['default']!r}")
                                   for k, v in r["fields"].items())
                table_rows.append((r["name"], r["summary"], fields))
            _table_to_stdout("passes", ("pass", "summary", "fields: type = default"), table_rows)


def _table_to_stdout(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A listing is the command's answer, so it goes to stdout (as text, or as JSON with --json)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint directory written by quantkit (or llm-compressor)")],
    as_json: JsonOpt = False,
) -> None:
    """Show what is quantized how, and bytes per part."""
    with error_boundary(as_json) as result:
        from quantkit.inspect import inspect_checkpoint

        info = inspect_checkpoint(checkpoint)
        result.report = info
        if as_json:
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        console.print(f"[bold]{checkpoint}[/bold]: quant_method={info['quant_method']}, format={info.get('format')}, "
                      f"{info['total_bytes']:,} bytes in {info['tensors']} tensors")
        table = Table(title="by part")
        for col in ("part", "tensors", "bytes", "dtypes"):
            table.add_column(col)
        for part, row in info["parts"].items():
            table.add_row(part, str(row["tensors"]), f"{row['bytes']:,}", ", ".join(sorted(row["dtypes"])))
        console.print(table)
        for g in info.get("groups") or []:
            console.print(f"group {g['name']}: {g['summary']} -> {g['targets']}")
        if info.get("extra"):
            console.print(info["extra"])


from quantkit.cli_sensitivity import sensitivity  # noqa: E402  (command modules import cli_common, not this file)

app.command("sensitivity")(sensitivity)

from quantkit.cli_verify import verify  # noqa: E402

app.command("verify")(verify)


def _usage_errors() -> tuple[type[Exception], ...]:
    """click's UsageError: typer vendors its own copy of click (typer._click) in recent versions."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).UsageError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def main(args: list[str] | None = None, prog_name: str | None = None) -> None:
    """Console entry point. With --json, usage errors (bad options) also answer with the envelope."""
    argv = list(sys.argv[1:] if args is None else args)
    if "--json" not in argv:
        app(args=argv, prog_name=prog_name)
        return
    try:
        code = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except _usage_errors() as e:
        print_json(json_envelope(None, e, 2))
        e.show()
        sys.exit(2)
    except typer.Abort:
        print_json(json_envelope(None, KeyboardInterrupt("interrupted"), 130))
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
