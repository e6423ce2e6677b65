"""The typer CLI: the only module that prints or exits; one error boundary.

Exit codes: 0 ok, 1 a quality gate failed, 2 usage or input error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from quantkit.errors import QuantkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization and compression of Hugging Face models.")
err_console = Console(stderr=True)

# options shared by several commands
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's), bf16, fp16 or fp32")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout; human text goes to stderr")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow the model's own Python code to run")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite an existing output")]


class _State:
    debug = False


def _quiet_libraries() -> None:
    from quantkit._memory import pin_mmap_threshold

    pin_mmap_threshold()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (torch configures its loggers on import; quiet them afterwards)

    for name in ("transformers", "torchao", "accelerate", "datasets", "torch", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _fail(message: str, code: int) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def error_boundary():
    try:
        yield
    except typer.Exit:
        raise
    except QuantkitError as e:
        if _State.debug:
            raise
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # an internal error: one line unless --debug
        if _State.debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug)", 3)


def make_progress(enabled: bool):
    """A progress factory for the pipeline: rich bars with ETA on stderr."""
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=err_console,
                        disable=not enabled, transient=True)

    @contextmanager
    def factory(description: str, total: int):
        task = progress.add_task(description, total=total or None)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)

        try:
            yield advance
        finally:
            if total:
                progress.update(task, completed=total)
            else:
                progress.update(task, total=1, completed=1)

    return progress, factory


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@app.callback()
def main_callback(debug: DebugOpt = False) -> None:
    _State.debug = debug
    _quiet_libraries()


@app.command()
def apply(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file, or the name of a shipped recipe")],
    model: Annotated[str, typer.Argument(help="hub id, local directory, GGUF file, or alias smollm2-135m")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="output directory")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe value: key=value")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
    max_ppl_increase: Annotated[Optional[float], typer.Option("--max-ppl-increase", help="fail (exit 1) if perplexity rises more than PCT percent")] = None,
    max_kl: Annotated[Optional[float], typer.Option("--max-kl", help="fail (exit 1) if mean token KL exceeds X")] = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="skip perplexity/KL evaluation")] = False,
) -> None:
    """Quantize MODEL with RECIPE and write a checkpoint plus report."""
    with error_boundary():
        from quantkit import api
        from quantkit.recipe import load_recipe

        overrides = list(set_ or [])
        if no_eval:
            overrides.append("eval.enabled=false")
        rec = load_recipe(recipe, overrides)
        if output is None:
            output = Path("out") / f"{Path(model).name}-{rec.name}"
        progress, factory = make_progress(enabled=True)
        try:
            with progress:
                report = api.apply(rec, model, output=output, force=force, device=device, dtype=dtype,
                                   trust_remote_code=trust_remote_code, max_ppl_increase=max_ppl_increase,
                                   max_kl=max_kl, progress=factory)
        except QuantkitError as e:
            rep = getattr(e, "report", None)
            if rep is not None and as_json:
                _print_json(rep.to_dict())
            raise
        _print_summary(report)
        if as_json:
            _print_json(report.to_dict())


def _print_summary(report) -> None:
    table = Table(title=f"quantkit apply: {report.recipe} on {report.model}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for row in report.summary_rows():
        table.add_row(*row)
    err_console.print(table)
    if report.output:
        err_console.print(f"wrote {report.output}")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="model or quantized checkpoint")],
    reference: Annotated[Optional[str], typer.Option("--reference", help="reference model for mean token KL")] = None,
    data: Annotated[str, typer.Option("--data", help="evaluation text: 'default' (held-out Wikipedia) or a .txt/.jsonl/.parquet file")] = "default",
    seq_len: Annotated[int, typer.Option("--seq-len")] = 512,
    max_windows: Annotated[int, typer.Option("--max-windows", help="windows of seq-len tokens (0 = all)")] = 64,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    trust_remote_code: TrustOpt = False,
    runtime: Annotated[str, typer.Option("--runtime", help="transformers (decompressing loader) or quantkit (real-quant modules, compressed-tensors checkpoints)")] = "transformers",
) -> None:
    """Perplexity on held-out text, and mean token KL against --reference."""
    with error_boundary():
        from quantkit import api

        progress, factory = make_progress(enabled=True)
        with progress:
            result = api.evaluate(model, reference=reference, data=data, seq_len=seq_len,
                                  max_windows=max_windows or None, device=device, dtype=dtype,
                                  trust_remote_code=trust_remote_code, runtime=runtime, progress=factory)
        table = Table(title=f"quantkit eval: {model}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in result.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        err_console.print(table)
        if as_json:
            _print_json(result)


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="recipe YAML file or shipped recipe name")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe value: key=value")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a recipe (fields, values, pass order) without loading a model."""
    with error_boundary():
        from quantkit.recipe import load_recipe

        rec = load_recipe(recipe, list(set_ or []))
        if as_json:
            _print_json(rec.to_dict())
        err_console.print(f"[green]ok[/green]: {recipe} ({rec.name}, {len(rec.passes)} passes)")


@app.command()
def recipes(as_json: JsonOpt = False) -> None:
    """List the shipped recipes."""
    with error_boundary():
        import yaml

        from quantkit.recipe import recipes_dir

        rows = []
        for path in sorted(recipes_dir().glob("*.yaml")):
            data = yaml.safe_load(path.read_text()) or {}
            rows.append({"name": path.stem, "description": data.get("description", "")})
        if as_json:
            _print_json(rows)
            return
        table = Table(title="shipped recipes")
        table.add_column("name")
        table.add_column("description")
        for r in rows:
            table.add_row(r["name"], r["description"])
        Console().print(table)


@app.command()
def formats(as_json: JsonOpt = False) -> None:
    """List the number formats."""
    with error_boundary():
        from quantkit.formats import FORMATS

        rows = [{"name": n, "bits_per_weight": f.bits, "doc": (type(f).__doc__ or "").strip().splitlines()[0]}
                for n, f in FORMATS.items()]
        if as_json:
            _print_json(rows)
            return
        table = Table(title="formats")
        for col in ("name", "bits/weight", "description"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], f"{r['bits_per_weight']:.3g}", r["doc"])
        Console().print(table)


@app.command()
def passes(as_json: JsonOpt = False) -> None:
    """List the passes with their fields and defaults."""
    with error_boundary():
        from quantkit.passes import PASSES

        rows = []
        for name, cls in PASSES.items():
            fields = {}
            for fname, info in cls.model_fields.items():
                default = None if info.is_required() else info.get_default(call_default_factory=True)
                if hasattr(default, "model_dump"):
                    default = default.model_dump()
                fields[fname] = {"type": str(info.annotation).replace("typing.", ""), "required": info.is_required(),
                                 "default": default}
            rows.append({"name": name, "summary": cls.summary, "requires": sorted(cls.requires),
                         "provides": sorted(cls.provides), "fields": fields})
        if as_json:
            _print_json(rows)
            return
        table = Table(title="passes")
        for col in ("pass", "summary", "fields (default)"):
            table.add_column(col)
        for r in rows:
            fields = ", ".join(f"{k}" + ("" if v["required"] else f"={v['default']!r}") for k, v in r["fields"].items())
            table.add_row(r["name"], r["summary"], fields)
        Console().print(table)


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint directory written by quantkit (or llm-compressor)")],
    as_json: JsonOpt = False,
) -> None:
    """Show what is quantized how, and bytes per part."""
    with error_boundary():
        from quantkit.inspect import inspect_checkpoint

        info = inspect_checkpoint(checkpoint)
        if as_json:
            _print_json(info)
            return
        console = Console()
        console.print(f"[bold]{checkpoint}[/bold]: quant_method={info['quant_method']}, format={info.get('format')}, "
                      f"{info['total_bytes']:,} bytes in {info['tensors']} tensors")
        table = Table(title="by part")
        for col in ("part", "tensors", "bytes", "dtypes"):
            table.add_column(col)
        for part, row in info["parts"].items():
            table.add_row(part, str(row["tensors"]), f"{row['bytes']:,}", ", ".join(sorted(row["dtypes"])))
        console.print(table)
        if info.get("groups"):
            for g in info["groups"]:
                console.print(f"group {g['name']}: {g['summary']} -> {g['targets']}")
        if info.get("extra"):
            console.print(info["extra"])


def _register_optional_commands() -> None:
    try:
        from quantkit.cli_sensitivity import sensitivity
    except ImportError:
        return
    app.command("sensitivity")(sensitivity)


_register_optional_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
