"""`quantkit sensitivity`: which components and blocks hurt most when quantized (spec §3).

One reference pass, then ALL (every block linear quantized), then isolation runs: component-wise
(one role in every block), block-wise (every role in one block), optionally block-complement
(all blocks but one) and grid (one role in one block). Each run is measured as PPL, dPPL,
relative dPPL and mean token KL against the reference on the same token windows. Per-matrix
diagnostics (Weibull fit, tails, outliers) are ranked against the measured sensitivities.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.analysis import checks as C
from quantkit.analysis.diagnostics import matrix_diagnostics, spearman
from quantkit.analysis.sweep import Sweep
from quantkit.arch import ArchInfo, arch_info
from quantkit.errors import CalibrationError, QuantkitError
from quantkit.formats import get_format
from quantkit.progress import PROGRESS_PREFIX
from quantkit.progress import clock as _clock
from quantkit.targets import Targets

ISOLATIONS = ("component", "block", "block-complement", "grid")
DEFAULT_ISOLATION = ("component", "block")
MODES = {"w4a16": False, "w4a4": True}  # mode -> quantize linear inputs too; names follow the FP4 paper
METRICS = ("kl", "ppl")
PARTIAL_NAME = "sensitivity.partial.json"
# diagnostics ranked against sensitivity; dk_init has k's ranks and is left out
RHO_COLUMNS = ("weibull_k", "weibull_r2", "kurtosis", "outlier_6sigma", "q90_q10", "p999_p50", "gini",
               "lambda_over_rms", "act_outlier_ratio")


class SensitivityError(QuantkitError):
    """Bad sensitivity options or a partial result that does not match them."""


@dataclass(frozen=True)
class Run:
    id: str  # "all", "component:up", "block:3", "block-complement:3", "grid:up:3"
    isolation: str
    component: str | None
    block: int | None
    modules: tuple[str, ...]


@dataclass
class RunResult:
    id: str
    isolation: str
    component: str | None
    block: int | None
    n_modules: int
    ppl: float
    dppl: float
    rel: float
    kl: float
    seconds: float

    def score(self, metric: str) -> float:
        return self.kl if metric == "kl" else self.dppl


@dataclass
class SensitivityResult:
    model: str
    format: str
    mode: str
    metric: str
    samples: int
    seq_len: int
    num_layers: int
    components: list[str]
    ppl_fp: float
    runs: list[RunResult]
    diagnostics: list[dict[str, Any]] = field(default_factory=list)  # one row per module
    spearman: list[dict[str, Any]] = field(default_factory=list)
    checks: list[C.Check] = field(default_factory=list)
    budget: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def runs_of(self, isolation: str) -> list[RunResult]:
        return [r for r in self.runs if r.isolation == isolation]

    def run(self, run_id: str) -> RunResult | None:
        return next((r for r in self.runs if r.id == run_id), None)

    def component_scores(self) -> dict[str, float]:
        return {r.component: r.score(self.metric) for r in self.runs_of("component")}

    def block_scores(self) -> dict[int, float]:
        return {r.block: r.score(self.metric) for r in self.runs_of("block")}

    def ranking(self, isolation: str) -> list[RunResult]:
        return sorted(self.runs_of(isolation), key=lambda r: -r.score(self.metric))

    def top_table(self, n: int = 10) -> tuple[list[str], list[list[str]]]:
        """Most sensitive isolation runs as (header, rows) of strings; the CLI prints it."""
        runs = sorted((r for r in self.runs if r.isolation != "all"), key=lambda r: -r.score(self.metric))[:n]
        header = ["rank", "run", "modules", "PPL", "dPPL", "rel dPPL", "KL"]
        rows = [
            [str(i + 1), r.id, str(r.n_modules), f"{r.ppl:.3f}", f"{r.dppl:+.4f}", f"{r.rel:+.2%}", f"{r.kl:.4g}"]
            for i, r in enumerate(runs)
        ]
        return header, rows

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranking"] = {iso: [r.id for r in self.ranking(iso)] for iso in ISOLATIONS if self.runs_of(iso)}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityResult:
        d = {k: v for k, v in d.items() if k != "ranking"}
        d["runs"] = [RunResult(**r) for r in d["runs"]]
        d["checks"] = [C.Check(**c) for c in d.get("checks", [])]
        return cls(**d)


MOE_COMPONENTS = ("experts", "router")


def component_order(arch: ArchInfo) -> list[str]:
    return list(arch.roles) + (list(MOE_COMPONENTS) if arch.is_moe else [])


def moe_units(model: nn.Module, arch: ArchInfo, targets: Targets | None = None) -> dict[str, tuple[int, str]]:
    """Fused-experts modules and routers -> (block, component), with Targets' semantics (roles
    empty or naming the component, layers, include/exclude globs).

    Experts count in every run a default recipe would quantize (ALL, block, complement); routers,
    which recipes keep in high precision, only in their own component and grid runs: the sweep
    answers what quantizing them would cost."""
    from quantkit.nn.qexperts import select_experts

    t = targets or Targets()
    chosen = set(select_experts(t, model, arch))
    out = {name: (layer, "experts") for layer in range(arch.num_layers) for name, _ in arch.experts(layer)
           if name in chosen}
    for layer in range(arch.num_layers):
        for name in arch.routers(layer):
            weight = getattr(model.get_submodule(name), "weight", None)
            if weight is not None and weight.dim() == 2 and t.covers(name, layer, "router"):
                out[name] = (layer, "router")
    return out


def plan_runs(arch: ArchInfo, names: list[str], isolation: tuple[str, ...],
              moe: dict[str, tuple[int, str]] | None = None) -> list[Run]:
    """ALL first, then the isolation families in the order the spec lists them."""
    where = {n: arch.role_of(n) for n in names} | dict(moe or {})
    comps = [c for c in component_order(arch) if any(w and w[1] == c for w in where.values())]
    blocks = sorted({w[0] for w in where.values() if w})

    def pick(pred, routers: bool = False) -> tuple[str, ...]:
        return tuple(n for n, w in where.items() if w and (routers or w[1] != "router") and pred(*w))

    runs = [Run("all", "all", None, None, tuple(n for n in where if (where[n] or (0, ""))[1] != "router"))]
    if "component" in isolation:
        runs += [Run(f"component:{c}", "component", c, None, pick(lambda b, r, c=c: r == c, True)) for c in comps]
    if "block" in isolation:
        runs += [Run(f"block:{b}", "block", None, b, pick(lambda bb, r, b=b: bb == b)) for b in blocks]
    if "block-complement" in isolation:
        runs += [
            Run(f"block-complement:{b}", "block-complement", None, b, pick(lambda bb, r, b=b: bb != b)) for b in blocks
        ]
    if "grid" in isolation:
        runs += [
            Run(f"grid:{c}:{b}", "grid", c, b, pick(lambda bb, r, b=b, c=c: bb == b and r == c, True))
            for b in blocks
            for c in comps
        ]
    return runs


def parse_isolation(isolation: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    parts = [p.strip() for p in isolation.split(",")] if isinstance(isolation, str) else list(isolation)
    bad = [p for p in parts if p not in ISOLATIONS]
    if bad or not parts:
        raise SensitivityError(f"unknown isolation {', '.join(bad) or '(empty)'}; known: {', '.join(ISOLATIONS)}")
    return tuple(dict.fromkeys(parts))


def sweep_tokens(model: nn.Module, tokenizer, samples: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Held-out windows [samples, seq_len], starting `offset` windows in (disjoint sets for re-checks)."""
    from quantkit.eval import eval_windows

    windows = eval_windows(model, tokenizer, seq_len=seq_len, max_windows=offset + samples)
    if windows.shape[0] < offset + samples:
        raise CalibrationError(
            f"held-out text has {windows.shape[0]} windows of {seq_len} tokens; {offset + samples} are needed"
        )
    return windows[offset : offset + samples]


def _fingerprint(model_name: str, fmt: str, mode: str, tokens: torch.Tensor) -> dict[str, Any]:
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]
    return {"model": model_name, "format": fmt, "mode": mode, "tokens": digest, "shape": list(tokens.shape)}


def _load_partial(path: Path, fingerprint: dict[str, Any]) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise SensitivityError(f"cannot read partial result {path}; delete it or drop --resume") from None
    if data.get("fingerprint") != fingerprint:
        raise SensitivityError(f"partial result {path} was made with other settings; delete it or drop --resume")
    return data.get("runs", {})


def _save_partial(path: Path, fingerprint: dict[str, Any], done: dict[str, dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "runs": done}))
    tmp.replace(path)


def module_diagnostics(model: nn.Module, arch: ArchInfo, names: list[str], act: dict[str, float]) -> list[dict]:
    rows = []
    for name in names:
        w = model.get_submodule(name).weight.detach()
        where = arch.role_of(name)
        row = {"module": name, "component": where[1] if where else None, "block": where[0] if where else None,
               "numel": w.numel(), "in_features": w.shape[1]}
        row.update(matrix_diagnostics(w))
        row["act_outlier_ratio"] = act.get(name, math.nan)
        rows.append(row)
    return rows


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def diagnostic_correlations(result: SensitivityResult) -> list[dict[str, Any]]:
    """Spearman rho between each diagnostic and the measured sensitivity, at every level measured."""
    rows = result.diagnostics
    levels: list[tuple[str, list[list[dict]], list[float]]] = []
    grid = {(r.component, r.block): r.score(result.metric) for r in result.runs_of("grid")}
    if grid:
        keyed = [(grid[(d["component"], d["block"])], [d]) for d in rows if (d["component"], d["block"]) in grid]
        levels.append(("matrix (grid)", [g for _, g in keyed], [s for s, _ in keyed]))
    comp = result.component_scores()
    if comp:
        levels.append(("component", [[d for d in rows if d["component"] == c] for c in comp], list(comp.values())))
    blocks = result.block_scores()
    if blocks:
        levels.append(("block", [[d for d in rows if d["block"] == b] for b in blocks], list(blocks.values())))
    out = []
    for level, groups, scores in levels:
        for col in RHO_COLUMNS:
            xs = [_mean([d[col] for d in g]) for g in groups]
            out.append({"level": level, "diagnostic": col, "n": len(scores), "rho": spearman(xs, scores)})
    return out


def run_sensitivity(
    model: nn.Module,
    tokenizer,
    *,
    format: str = "nvfp4",
    mode: str = "w4a16",
    isolation: str | tuple[str, ...] = DEFAULT_ISOLATION,
    metric: str = "kl",
    samples: int = 16,
    seq_len: int = 512,
    out_dir: str | Path | None = None,
    resume: bool = False,
    budget_bits: float | None = None,
    progress: bool = False,
    tokens: torch.Tensor | None = None,
    model_name: str | None = None,
    batch_size: int = 4,
    targets: Targets | None = None,
    compare: SensitivityResult | None = None,
    threads: int | None = None,
) -> SensitivityResult:
    """Sweep isolation runs on `model` (restored bit-exactly afterwards) and return the result.

    `tokens` overrides the held-out windows; `compare` is a result for another model (C4).
    With `out_dir`, a partial file is written after every run and the reports at the end.
    `threads` sets torch's intra-op threads for the sweep (on a busy shared CPU, 1 thread avoids
    the spin-wait slowdown of oversubscribed thread pools).
    """
    if mode not in MODES:
        raise SensitivityError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if metric not in METRICS:
        raise SensitivityError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if samples < 1 or seq_len < 2:
        raise SensitivityError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    isolations = parse_isolation(isolation)
    fmt = get_format(format)
    t_start = time.perf_counter()
    arch = arch_info(model)
    names = (targets or Targets()).select(model, arch)
    if not names:
        raise SensitivityError("no linear layers selected for the sweep")
    model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
    if tokens is None:
        tokens = sweep_tokens(model, tokenizer, samples, seq_len)
    moe = moe_units(model, arch, targets)  # issue 14: components `experts` and `router`
    runs = plan_runs(arch, names, isolations, moe)
    if budget_bits is not None:
        _check_budget(model, names, format, budget_bits)  # fail before the sweep, not after it

    out = Path(out_dir) if out_dir is not None else None
    fingerprint = _fingerprint(model_name, format, mode, tokens)
    done: dict[str, dict] = {}
    partial = out / PARTIAL_NAME if out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        if resume and partial.exists():
            done = _load_partial(partial, fingerprint)

    orig_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    # fp32 on CPU: bf16 matmuls are slower there, and fp32 keeps tiny deltas visible
    with fp32_compute(model):
        model.eval()
        try:
            sweep = Sweep(model, arch, fmt, tokens, names, act_quant=MODES[mode], batch_size=batch_size, moe=moe)
            ppl_fp = sweep.reference()
            t_ref = time.perf_counter() - t_start
            results = _run_all(sweep, runs, done, ppl_fp, progress, lambda: partial and _save_partial(partial, fingerprint, done))
            result = SensitivityResult(
                model=model_name, format=format, mode=mode, metric=metric, samples=int(tokens.shape[0]),
                seq_len=int(tokens.shape[1]), num_layers=len(arch.layers(model)),
                components=[c for c in component_order(arch) if any(r.component == c for r in results)] or list(arch.roles),
                ppl_fp=ppl_fp, runs=results,
            )
            result.diagnostics = module_diagnostics(model, arch, names, sweep.act_outliers)
            result.spearman = diagnostic_correlations(result)
            result.checks = C.single_result_checks(result) + C.cross_model_checks(result, compare)
            if sweep.ref and sweep.ref[0].index is not None:
                result.notes.append(
                    f"KL uses the reference's top-{sweep.ref[0].logp.shape[-1]} tokens plus one tail bucket "
                    "(a lower bound on the full-vocabulary KL)"
                )
            if budget_bits is not None:
                from quantkit.analysis.budget import budget_choice

                result.budget = budget_choice(result, sweep, model, arch, names, budget_bits)
            result.timings = {"reference_s": t_ref, "total_s": time.perf_counter() - t_start,
                              "runs_s": sum(r.seconds for r in results)}
        finally:
            model.train(was_training)
            torch.set_num_threads(orig_threads)
    if out:
        from quantkit.analysis.report import write_reports

        write_reports(result, out)
        if partial.exists():
            partial.unlink()  # the sweep is complete; the reports hold every run
    return result


def _owned_tensors(model: nn.Module):
    """(module, leaf, tensor, is_parameter) for every parameter and buffer, non-persistent ones included."""
    for _, m in model.named_modules():
        for leaf, t in m._parameters.items():
            if t is not None:
                yield m, leaf, t, True
        for leaf, t in m._buffers.items():
            if t is not None:
                yield m, leaf, t, False


def _tensor_dtypes(model: nn.Module) -> dict[tuple[int, str], torch.dtype]:
    return {(id(m), leaf): t.dtype for m, leaf, t, _ in _owned_tensors(model)}


@contextmanager
def fp32_compute(model: nn.Module):
    """The model in fp32 inside the block; afterwards every parameter and buffer has its own dtype
    and, for 16-bit ones, its exact values back (see _restore_dtypes)."""
    dtypes = _tensor_dtypes(model)
    model.float()
    try:
        yield model
    finally:
        _restore_dtypes(model, dtypes)


def _restore_dtypes(model: nn.Module, dtypes: dict[tuple[int, str], torch.dtype]) -> None:
    """Undo model.float() tensor by tensor.

    A bf16/fp16 tensor round-trips through fp32 exactly. Casting the whole model back with
    model.to(dtype) would instead also cast tensors that were fp32 to begin with, such as the
    rotary inv_freq buffer transformers keeps in fp32, and round them.
    """
    for m, leaf, t, is_param in list(_owned_tensors(model)):
        dtype = dtypes.get((id(m), leaf))
        if dtype is None or t.dtype == dtype:
            continue
        if is_param:
            t.data = t.data.to(dtype)
        else:
            m._buffers[leaf] = t.to(dtype)


def _check_budget(model: nn.Module, names: list[str], fmt: str, budget_bits: float) -> None:
    from quantkit.analysis.budget import BudgetError, average_bits

    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    floor = average_bits({n: fmt for n in names}, shapes)
    if budget_bits < floor - 1e-9:
        raise BudgetError(f"--budget-bits {budget_bits:g} is below {floor:.3f}, the cost of {fmt} everywhere")


def _run_all(sweep: Sweep, runs: list[Run], done: dict[str, dict], ppl_fp: float, progress: bool, save) -> list[RunResult]:
    results = []
    with _progress(progress, len(runs)) as advance:
        for run in runs:
            if run.id in done:
                results.append(RunResult(**done[run.id]))
                advance(run.id)
                continue
            m = sweep.measure(list(run.modules))
            dppl = m.ppl - ppl_fp
            r = RunResult(run.id, run.isolation, run.component, run.block, len(run.modules), m.ppl, dppl,
                          dppl / ppl_fp, m.kl, m.seconds)
            results.append(r)
            done[run.id] = asdict(r)
            save()
            advance(run.id)
    return results


@contextmanager
def _progress(enabled: bool, total: int, stream=None):
    """advance(run_id) per finished run: a rich bar on a terminal; in logs and pipes, plain lines
    like apply's (`[quantkit] sensitivity: 3/12 component:up, elapsed 0:42, eta 2:06`), one per run."""
    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        start, count = time.perf_counter(), 0

        def line(text: str) -> None:
            stream.write(PROGRESS_PREFIX + "sensitivity: " + text + "\n")
            stream.flush()

        def advance(run_id: str) -> None:
            nonlocal count
            count += 1
            elapsed = time.perf_counter() - start
            eta = f", eta {_clock(elapsed / count * (total - count))}" if count < total else ""
            line(f"{count}/{total} {run_id}, elapsed {_clock(elapsed)}{eta}")

        line(f"started (0/{total} runs)")
        yield advance
        line(f"done {total}/{total} in {_clock(time.perf_counter() - start)}")
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled, transient=False,
    ) as bar:
        task = bar.add_task("sensitivity", total=total)

        def advance(run_id: str) -> None:
            bar.update(task, description=f"{run_id:<24}")
            bar.advance(task)

        yield advance
