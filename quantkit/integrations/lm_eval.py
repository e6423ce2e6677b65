"""`quantkit eval MODEL --tasks ...`: lm-evaluation-harness tasks on a model quantkit loaded.

The model (a hub id, local directory, GGUF alias, or a quantized checkpoint, in transformers'
runtime or quantkit's real-quant runtime) is loaded by quantkit and handed to lm-eval's own HF
model class (HFLM) as an instance, so lm-eval's request batching, tokenization and metrics are
used unchanged. Local tasks: a folder of task YAML files (`--task-dir`), as lm-eval's
TaskManager(include_path=...) reads them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError

INSTALL_HINT = "lm-eval is not installed; pip install 'quantkit[lm-eval]'"


class LmEvalError(QuantkitError):
    """lm-eval is missing, or a task name or task file is wrong."""


@contextmanager
def _lm_eval_logs_quiet():
    """lm-eval logs at WARNING that a model instance (not a name) was passed, which is the point
    here, plus per-task INFO lines; keep its logger at ERROR for the run and restore it."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _metrics(task_result: dict) -> dict:
    """lm-eval's "acc,none" keys -> "acc" (the unfiltered metric), numbers only."""
    out = {}
    for key, value in task_result.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name, _, filt = key.partition(",")
        out[name if filt in ("", "none") else f"{name} ({filt})"] = value
    return out


def _task_manager(cls, names: list[str], include_paths: list[Path]):
    """Only the local task folders when they define every requested task: indexing lm-eval's
    ~15k built-in task files takes tens of seconds on a small CPU machine."""
    paths = [str(p) for p in include_paths]
    if paths:
        local = cls(include_path=paths, include_defaults=False)
        if all(n in set(local.all_tasks) for n in names):
            return local
    return cls(include_path=paths or None)


def run_tasks(
    model_spec: str,
    tasks: str,
    *,
    limit: int | None = None,
    include_paths: list[Path] | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "auto",
    runtime: str = "transformers",
    trust_remote_code: bool = False,
    progress=None,
) -> dict:
    """Run lm-eval tasks -> {model, runtime, tasks, limit, results: {task: {metric: value}}, ...}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalError(INSTALL_HINT) from None
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise LmEvalError("--tasks is empty; name at least one lm-eval task")
    if limit is not None and limit < 1:
        raise LmEvalError(f"--limit must be at least 1, got {limit}")
    for p in include_paths or []:
        if not Path(p).is_dir():
            raise LmEvalError(f"--task-dir {p} is not a folder of task YAML files")
    if progress is None:
        from quantkit.pipeline import null_progress as progress

    with _lm_eval_logs_quiet():
        manager = _task_manager(TaskManager, names, include_paths or [])
        known = set(manager.all_tasks)
        unknown = [n for n in names if n not in known]
        if unknown:
            hint = "" if include_paths else " (a local task needs --task-dir FOLDER)"
            raise LmEvalError(f"unknown lm-eval task {unknown[0]!r}{hint}")
        with progress("load model", 0):
            from quantkit.api import load_for_eval  # the loading `quantkit eval` scores

            model, tok = load_for_eval(model_spec, runtime, device=device, dtype=dtype,
                                       trust_remote_code=trust_remote_code)
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        with progress(f"lm-eval: {', '.join(names)}", 0):
            raw = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0)
    return {
        "model": model_spec,
        "runtime": runtime,
        "tasks": names,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "results": {task: _metrics(res) for task, res in raw["results"].items()},
        "n_samples": raw.get("n-samples", {}),
        "versions": raw.get("versions", {}),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
