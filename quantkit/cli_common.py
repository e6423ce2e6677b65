"""What every quantkit command shares: option aliases, the error boundary, the --json envelope,
progress on stderr, and keeping library noise off stderr.

cli.py and the command modules (cli_sensitivity.py, cli_verify.py) import from here; nothing
here imports them, so there is no import cycle.

Streams: stdout carries only a command's answer (a listing, or the one JSON object of --json);
progress, summaries, "wrote ..." lines and errors go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from quantkit.errors import QuantkitError
from quantkit.progress import PROGRESS_PREFIX
from quantkit.progress import clock as _clock

JSON_SCHEMA_VERSION = 1  # bump when the envelope's shape changes (docs/cli.md)
PLAIN_PROGRESS_INTERVAL_S = 5.0  # CI logs: at most one progress line per stage per interval

err_console = Console(stderr=True)

# options shared by several commands
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or auto")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's), bf16, fp16 or fp32")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="print exactly one JSON object on stdout, also on errors (schema in docs/cli.md)")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="allow the model's own Python code to run")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite an existing output")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a recipe value: key=value (repeatable)")]
ModelArg = Annotated[str, typer.Argument(help="hub id, local directory, GGUF file, or alias smollm2-135m")]
OutputDirOpt = Annotated[Path | None, typer.Option("-o", "--output", help="output directory")]


class State:
    debug = False


# --- library noise --------------------------------------------------------------------------

# Loggers whose messages are known to be harmless for quantkit's use, each with the reason.
# Only these are raised to ERROR; no warnings filter is installed.
QUIET_LOGGERS = {
    # torchao (imported by transformers' quantizer registry) logs each CUDA kernel library it
    # cannot load; on a CPU machine none load and quantkit never calls them
    "torchao": "CUDA kernel .so load failures on CPU",
    # torch.utils._pytree logs a deprecation for enums torchao registers at import
    "torch.utils._pytree": "Enum register_constant deprecation from torchao's import",
}


def quiet_libraries() -> None:
    """Keep known-harmless library messages off stderr; call before models load."""
    from quantkit._memory import pin_mmap_threshold

    pin_mmap_threshold()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers reads it on import
    # quantkit draws its own progress (rich bars or plain lines); the libraries' tqdm bars would
    # interleave with it (huggingface_hub's switch also turns off transformers' weight-loading bar)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    _silence_tqdm()
    if "transformers" in sys.modules:  # imported already (in-process callers): env vars are read
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _silence_tqdm() -> None:
    """compressed-tensors draws plain tqdm bars ("Applying quantization config", "Dispatching
    model") when transformers loads a checkpoint, and passes `disable=` explicitly, so tqdm's own
    TQDM_DISABLE cannot turn them off. The CLI therefore forces disable=True in tqdm's constructor
    (every `from tqdm import tqdm` shares the class). A user's TQDM_DISABLE=0 keeps the bars."""
    if os.environ.get("TQDM_DISABLE", "1") in ("0", "false", "False"):
        return
    import tqdm

    if getattr(tqdm.tqdm.__init__, "_quantkit_silenced", False):
        return
    original = tqdm.tqdm.__init__

    def silenced(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    silenced._quantkit_silenced = True
    tqdm.tqdm.__init__ = silenced


def quiet_torch_loggers() -> None:
    """torch sets its own loggers' levels when it is imported; re-quiet ours afterwards."""
    if "torch" in sys.modules:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


# --- errors and the --json envelope ----------------------------------------------------------


def json_envelope(report: Any = None, error: BaseException | None = None, exit_code: int = 0) -> dict:
    """The fixed shape of every --json answer (docs/cli.md)."""
    err = None
    if error is not None:
        err = {"type": type(error).__name__, "message": first_line(error), "exit_code": exit_code}
    return {"schema_version": JSON_SCHEMA_VERSION, "ok": error is None, "error": err, "report": report}


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def first_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__


class Outcome:
    """What a command hands to the boundary: its report (any JSON-able value)."""

    def __init__(self) -> None:
        self.report: Any = None


@contextmanager
def error_boundary(as_json: bool = False) -> Iterator[Outcome]:
    """One red line and an exit code for errors; with --json, exactly one envelope on stdout."""
    out = Outcome()
    try:
        yield out
    except typer.Exit:
        raise
    except QuantkitError as e:
        report = getattr(e, "report", None)
        if report is not None and hasattr(report, "to_dict"):
            out.report = report.to_dict()
        _fail(e, first_line(e), e.exit_code, out, as_json)
    except KeyboardInterrupt as e:
        _fail(e, "interrupted", 130, out, as_json)
    except Exception as e:  # an internal error: one line unless --debug
        _fail(e, f"internal error: {type(e).__name__}: {first_line(e)} (rerun with --debug)", 3, out, as_json)
    else:
        if as_json:
            print_json(json_envelope(out.report))


def _fail(e: BaseException, message: str, code: int, out: Outcome, as_json: bool) -> None:
    if as_json:
        env = json_envelope(out.report, e, code)
        env["error"]["message"] = message
        print_json(env)
    if State.debug and not isinstance(e, KeyboardInterrupt):
        raise e
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# --- progress ---------------------------------------------------------------------------------



class PlainProgress:
    """Progress for logs (stderr not a terminal): plain lines, at most one per stage every
    `interval` seconds, plus a line when a stage starts and when it ends, each starting with
    PROGRESS_PREFIX so a log filter can keep or drop them."""

    def __init__(self, stream=None, interval: float = PLAIN_PROGRESS_INTERVAL_S, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.interval = interval
        self.clock = clock

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    @contextmanager
    def stage(self, description: str, total: int):
        start = last = self.clock()
        done = 0
        self._line(f"{PROGRESS_PREFIX}{description}: started" + (f" (0/{total})" if total else ""))

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = self.clock()
            if now - last < self.interval or (total and done >= total):
                return  # rate-limited; a finished stage gets its "done" line instead
            last = now
            elapsed = now - start
            line = f"{PROGRESS_PREFIX}{description}: {done}/{total or '?'} elapsed {_clock(elapsed)}"
            if total and 0 < done < total:
                line += f" eta {_clock(elapsed / done * (total - done))}"
            self._line(line)

        yield advance  # on an error no "done" line: the error line says what happened
        end = f"{total}/{total} " if total else ""
        self._line(f"{PROGRESS_PREFIX}{description}: done {end}in {_clock(self.clock() - start)}")


def make_progress(enabled: bool = True, stream=None):
    """(context manager to hold while working, factory for the pipeline).

    A terminal gets rich bars with ETA; anything else (CI logs, pipes) gets PlainProgress lines.
    """
    target = stream or sys.stderr
    if enabled and not target.isatty():
        plain = PlainProgress(target)
        return plain, plain.stage
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

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
