"""QuantVLA (arXiv 2602.20309): attention temperature matching (ATM) and output head balancing (OHB).

Both compare a quantized student with the full-precision teacher on the calibration buffer:
ATM gives each head h of each attention module in scope a factor α = std_T / std_Q of its
pre-softmax logits and multiplies the query by it; OHB gives each attention module a factor
β = RMS_T / RMS_Q of its output projection (before the residual add) and multiplies that
output by it. Both are folded into the model by default (exact; see quantvla_math).
Specs: /work/shared/specs/algorithms.md §4; decisions: docs/quantvla.md.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from quantkit.passes.quantvla.attn_capture import AttnSite, StatMean, capture_logit_std, capture_output_rms, run_batches
from quantkit.errors import CalibrationError, QuantkitError
from quantkit.passes.base import Pass, register_pass
from quantkit.stream.capture import run_block
from quantkit.passes.quantvla.ratios import (
    DIT_PATTERNS,
    apply_alpha,
    apply_beta,
    clip_ratio,
    raw_ratio,
    remove_runtime_scales,
    runtime_handles,
    select_sites,
)
from quantkit.targets import Targets

# defaults from the authors' GR00T code (gr00t/atm/dit_atm.py, compute_beta_values)
ALPHA_CLIP = (0.7, 1.4)
ALPHA_NEUTRAL = 0.02  # |α - 1| below this -> α = 1
BETA_LOG_CLIP = 0.30  # |log β| clamped to this
BETA_NEUTRAL = 0.03  # |log β| below this -> β = 1
STATS_KEY = "quantvla"  # ctx.stats[STATS_KEY] caches teacher statistics between the two passes


# --- measuring ------------------------------------------------------------------------------


def measure(
    model: nn.Module,
    sites: Sequence[AttnSite],
    batches: Sequence,
    *,
    logits: bool = True,
    rms: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]], dict[str, float]]:
    """One pass over the batches -> (logit std [H] per site, (H, head_dim) per site, o-proj RMS)."""
    std, out = StatMean(), StatMean()
    names = [s.name for s in sites] if logits else []
    o_paths = {s.name: f"{s.name}.{s.o_path}" for s in sites} if rms else {}
    was_training = model.training
    model.eval()
    try:
        with capture_logit_std(model, names, std), capture_output_rms(model, o_paths, out):
            run_batches(model, batches, progress)
    finally:
        model.train(was_training)
    missing = [n for n in names if n not in std.calls]
    if missing:
        raise QuantkitError(
            f"attention modules {', '.join(missing[:3])} never called an attention function from "
            "transformers' AttentionInterface; QuantVLA cannot read their logits"
        )
    return std.means(), dict(std.heads), {k: float(v) for k, v in out.means().items()}


def alphas(
    std_t: dict[str, torch.Tensor],
    std_q: dict[str, torch.Tensor],
    clip: tuple[float, float] = ALPHA_CLIP,
    neutral: float = ALPHA_NEUTRAL,
    domain: str = "linear",
) -> dict[str, torch.Tensor]:
    return {n: clip_ratio(raw_ratio(std_t[n], std_q[n]), *clip, neutral, domain) for n in std_q}


def betas(
    rms_t: dict[str, float], rms_q: dict[str, float], log_clip: float = BETA_LOG_CLIP, neutral: float = BETA_NEUTRAL
) -> dict[str, float]:
    lo, hi = math.exp(-log_clip), math.exp(log_clip)
    return {
        n: float(clip_ratio(raw_ratio(torch.tensor(rms_t[n]), torch.tensor(rms_q[n])), lo, hi, neutral, "log"))
        for n in rms_q
    }


# --- the library API (spec §4.5) ------------------------------------------------------------


def calibrate_atm_ohb(
    teacher: nn.Module,
    student: nn.Module,
    batches: Sequence,
    *,
    scope: str = "dit",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    alpha_clip: tuple[float, float] = ALPHA_CLIP,
    alpha_neutral: float = ALPHA_NEUTRAL,
    alpha_domain: str = "linear",
    beta_log_clip: float = BETA_LOG_CLIP,
    beta_neutral: float = BETA_NEUTRAL,
    ohb_after_atm: bool = True,
) -> dict[str, dict]:
    """{attention module: {"alpha": [H], "beta": float, "head_dim": d}}; the student is left unchanged."""
    batches = list(batches)
    sites = select_sites(student, scope, include, exclude)
    std_t, _, rms_t = measure(teacher, sites, batches)
    std_q, heads, rms_q = measure(student, sites, batches)
    alpha = alphas(std_t, std_q, alpha_clip, alpha_neutral, alpha_domain)
    if ohb_after_atm:  # measure OHB on the student with ATM applied (runtime, removed after)
        before = runtime_handles(student)
        for s in sites:
            apply_alpha(student, s, alpha[s.name], heads[s.name][1], fold=False)
        try:
            _, _, rms_q = measure(student, sites, batches, logits=False)
        finally:
            remove_runtime_scales(student, keep=before)
    beta = betas(rms_t, rms_q, beta_log_clip, beta_neutral)
    return {
        s.name: {"alpha": alpha[s.name].tolist(), "beta": beta[s.name], "head_dim": heads[s.name][1]} for s in sites
    }


def apply_atm_ohb(student: nn.Module, table: dict[str, dict], fold: bool = True) -> dict[str, tuple[str, str]]:
    """Apply a calibrate_atm_ohb table; returns where α and β went for each module."""
    sites = {s.name: s for s in select_sites(student, "all", include=list(table), dit_patterns=())}
    where = {}
    for name, row in table.items():
        a = torch.tensor(row["alpha"], dtype=torch.float32)
        wa = "unchanged" if bool((a == 1).all()) else apply_alpha(student, sites[name], a, row["head_dim"], fold)
        wb = "unchanged" if row["beta"] == 1.0 else apply_beta(student, sites[name], row["beta"], fold)
        where[name] = (wa, wb)
    return where


# --- the passes -----------------------------------------------------------------------------


class _QuantVLAPass(Pass):
    requires: ClassVar[frozenset[str]] = frozenset({"calib", "quantized"})
    needs_teacher: ClassVar[bool] = True

    scope: Literal["dit", "llm", "all"] = "dit"  # paper: DiT (action head) attention only
    include: list[str] = []  # globs over attention-module names, narrowing the scope
    exclude: list[str] = []
    dit_patterns: list[str] = Field(default_factory=lambda: list(DIT_PATTERNS))
    fold: bool = True  # False: runtime forward hooks (analysis only; not saved in checkpoints)

    @property
    def execution(self) -> str:  # decoder attention runs per block; a VLA's DiT needs the whole model
        return "block" if self.scope == "llm" else "model"

    def check_model(self, model: nn.Module) -> None:
        try:
            select_sites(model, self.scope, self.include, self.exclude, self.dit_patterns)
        except QuantkitError as e:
            raise QuantkitError(f"{self.name}: {e}") from None

    # -- the block loop (scope llm): the teacher is block i as loaded, on the same inputs -----------
    def begin(self, ctx) -> None:
        ctx.scratch.setdefault(STATS_KEY, {"teacher_std": {}, "teacher_rms": {}, "heads": {}})
        ctx.scratch.setdefault(self.name, {"sites": 0, "rows": {}})

    def needs_inputs(self, ctx) -> bool:
        return True

    def _block_sites(self, blk) -> list[AttnSite]:
        try:
            local = select_sites(blk.module, "llm", (), (), self.dit_patterns)
        except QuantkitError:
            return []
        full = lambda s: f"{blk.prefix}.{s.name}"  # noqa: E731
        return [s for s in local if (not self.include or any(fnmatchcase(full(s), p) for p in self.include))
                and not any(fnmatchcase(full(s), p) for p in self.exclude)]

    def _block_teacher(self, blk, ctx, sites) -> dict:
        cache = ctx.scratch[STATS_KEY]
        key = blk.prefix
        if key not in cache["teacher_std"]:
            teacher = blk.extra["original"]
            std_t, heads, rms_t = measure(teacher, sites, lambda: run_block(teacher, blk.hidden, blk.calls))
            cache["teacher_std"][key], cache["teacher_rms"][key], cache["heads"][key] = std_t, rms_t, heads
        return cache

    def _student(self, blk, sites, logits: bool = True):
        return measure(blk.module, sites, lambda: run_block(blk.module, blk.hidden, blk.calls), logits=logits)

    def finish(self, ctx) -> None:
        if self.execution == "block" and not ctx.scratch[self.name]["sites"]:
            raise QuantkitError(f"QuantVLA scope {self.scope!r} matched no attention modules")
        if self.execution == "block":
            self._record(ctx, ctx.scratch[self.name]["rows"])

    def _setup(self, model: nn.Module, ctx) -> tuple[list[AttnSite], list, dict]:
        if ctx.teacher is None:
            raise CalibrationError(f"{self.name} needs the unquantized teacher; the pipeline did not keep one")
        sites = select_sites(model, self.scope, self.include, self.exclude, self.dit_patterns)
        batches = list(ctx.calib_batches())
        if not batches:
            raise CalibrationError(f"{self.name}: the calibration buffer is empty")
        cache = ctx.stats.setdefault(STATS_KEY, {"teacher_std": {}, "teacher_rms": {}, "heads": {}})
        return sites, batches, cache

    def work_units(self, ctx) -> int:
        """Calibration sequences forwarded: teacher (unless cached) and student."""
        n = getattr(ctx.calib_config, "n_samples", 0)  # recipe data or a loader's batches (loaders.Loaded)
        cached = bool(ctx.stats.get(STATS_KEY, {}).get("teacher_std"))
        return n * (1 if cached else 2)

    def _teacher_stats(self, ctx, sites, batches, cache) -> None:
        todo = [s for s in sites if s.name not in cache["teacher_std"]]
        if todo:
            std_t, heads, rms_t = measure(ctx.teacher, todo, batches, progress=ctx.progress)
            cache["teacher_std"].update(std_t)
            cache["teacher_rms"].update(rms_t)
            cache["heads"].update(heads)


@register_pass
class AttentionTemperature(_QuantVLAPass):
    name: ClassVar[str] = "attention_temperature"
    summary: ClassVar[str] = "QuantVLA ATM: per-head logit temperature matched to the teacher, folded into q"
    provides: ClassVar[frozenset[str]] = frozenset({"atm"})

    alpha_clip: tuple[float, float] = ALPHA_CLIP
    alpha_neutral: float = ALPHA_NEUTRAL
    alpha_domain: Literal["linear", "log"] = "linear"  # "log": paper text, |log α| band and clamp

    def run_block(self, blk, ctx) -> None:
        sites = self._block_sites(blk)
        if not sites:
            return
        cache = self._block_teacher(blk, ctx, sites)
        std_q, heads, rms_q = self._student(blk, sites)
        ctx.scratch.setdefault("quantvla_pre_atm", {}).update({f"{blk.prefix}.{k}": v for k, v in rms_q.items()})
        table = alphas(cache["teacher_std"][blk.prefix], std_q, self.alpha_clip, self.alpha_neutral, self.alpha_domain)
        rows = ctx.scratch[self.name]["rows"]
        for s in sites:
            a = table[s.name]
            applied = "unchanged"
            if not bool((a == 1).all()):
                applied = apply_alpha(blk.module, s, a, heads[s.name][1], self.fold)
            rows[f"{blk.prefix}.{s.name}"] = (a, applied)
        ctx.scratch[self.name]["sites"] += len(sites)

    def _record(self, ctx, rows: dict) -> None:
        flat = torch.cat([a for a, _ in rows.values()])
        lo, hi = self.alpha_clip
        ctx.record(self.name, scope=self.scope, modules=len(rows), heads=int(flat.numel()),
                   neutral=int((flat == 1).sum()),
                   clipped=int(((flat - lo).abs() < 1e-7).sum() + ((flat - hi).abs() < 1e-7).sum()),
                   alpha_min=float(flat.min()), alpha_max=float(flat.max()),
                   applied={n: w for n, (_, w) in rows.items() if w != "unchanged"},
                   alpha={n: [round(v, 6) for v in a.tolist()] for n, (a, _) in rows.items()})

    def run(self, model: nn.Module, ctx) -> None:
        if self.execution == "block" and ctx.teacher is None and ctx.arch is not None:  # the block loop
            return super().run(model, ctx)
        sites, batches, cache = self._setup(model, ctx)
        self._teacher_stats(ctx, sites, batches, cache)
        std_q, heads, rms_q = measure(model, sites, batches, progress=ctx.progress)
        # the uncorrected student's o_proj RMS, for head_balance with after_atm: false
        cache.setdefault("student_rms_pre_atm", {}).update(rms_q)
        table = alphas(cache["teacher_std"], std_q, self.alpha_clip, self.alpha_neutral, self.alpha_domain)
        where = {}
        for s in sites:
            a = table[s.name]
            if not bool((a == 1).all()):  # all-neutral heads leave the model bit-identical
                where[s.name] = apply_alpha(model, s, a, heads[s.name][1], self.fold)
        cache.setdefault("alpha", {}).update(table)
        flat = torch.cat([table[s.name] for s in sites])
        lo, hi = self.alpha_clip
        ctx.record(
            self.name,
            scope=self.scope,
            modules=len(sites),
            heads=int(flat.numel()),
            neutral=int((flat == 1).sum()),
            clipped=int(((flat - lo).abs() < 1e-7).sum() + ((flat - hi).abs() < 1e-7).sum()),
            alpha_min=float(flat.min()),
            alpha_max=float(flat.max()),
            applied=where,
            alpha={s.name: [round(v, 6) for v in table[s.name].tolist()] for s in sites},
        )


@register_pass
class HeadBalance(_QuantVLAPass):
    name: ClassVar[str] = "head_balance"
    summary: ClassVar[str] = "QuantVLA OHB: per-layer attention output gain matched to the teacher, folded into o_proj"
    provides: ClassVar[frozenset[str]] = frozenset({"ohb"})

    beta_log_clip: float = BETA_LOG_CLIP
    beta_neutral: float = BETA_NEUTRAL
    after_atm: bool = True  # False: β from the student before ATM (the GR00T tool's order)

    def run_block(self, blk, ctx) -> None:
        sites = self._block_sites(blk)
        if not sites:
            return
        cache = self._block_teacher(blk, ctx, sites)
        pre = ctx.scratch.get("quantvla_pre_atm", {})
        if not self.after_atm and pre:
            rms_q = {s.name: pre[f"{blk.prefix}.{s.name}"] for s in sites}
        else:
            _, _, rms_q = self._student(blk, sites, logits=False)
        table = betas(cache["teacher_rms"][blk.prefix], rms_q, self.beta_log_clip, self.beta_neutral)
        rows = ctx.scratch[self.name]["rows"]
        for s in sites:
            applied = apply_beta(blk.module, s, table[s.name], self.fold) if table[s.name] != 1.0 else "unchanged"
            rows[f"{blk.prefix}.{s.name}"] = (table[s.name], applied)
        ctx.scratch[self.name]["sites"] += len(sites)

    def _record(self, ctx, rows: dict) -> None:
        values = [b for b, _ in rows.values()]
        ctx.record(self.name, scope=self.scope, after_atm=self.after_atm, modules=len(rows),
                   neutral=sum(v == 1.0 for v in values), beta_min=min(values), beta_max=max(values),
                   applied={n: w for n, (_, w) in rows.items() if w != "unchanged"},
                   beta={n: round(b, 6) for n, (b, _) in rows.items()})

    def run(self, model: nn.Module, ctx) -> None:
        if self.execution == "block" and ctx.teacher is None and ctx.arch is not None:  # the block loop
            return super().run(model, ctx)
        sites, batches, cache = self._setup(model, ctx)
        self._teacher_stats(ctx, sites, batches, cache)
        pre = cache.get("student_rms_pre_atm", {})
        if not self.after_atm and "alpha" in cache:
            missing = [s.name for s in sites if s.name not in pre]
            if missing:
                raise QuantkitError(
                    f"head_balance after_atm: false needs attention_temperature to cover {missing[0]}; "
                    "use the same scope for both passes"
                )
            rms_q = {s.name: pre[s.name] for s in sites}
        else:
            _, _, rms_q = measure(model, sites, batches, logits=False, progress=ctx.progress)
        table = betas(cache["teacher_rms"], rms_q, self.beta_log_clip, self.beta_neutral)
        where = {s.name: apply_beta(model, s, table[s.name], self.fold) for s in sites if table[s.name] != 1.0}
        cache.setdefault("beta", {}).update(table)
        values = [table[s.name] for s in sites]
        ctx.record(
            self.name,
            scope=self.scope,
            after_atm=self.after_atm,
            modules=len(sites),
            neutral=sum(v == 1.0 for v in values),
            beta_min=min(values),
            beta_max=max(values),
            applied=where,
            beta={s.name: round(table[s.name], 6) for s in sites},
        )


# --- the selective layout (spec §4.1) ------------------------------------------------------

LLM_LINEARS = (
    *("*q_proj", "*k_proj", "*v_proj", "*o_proj", "*qkv_proj"),
    *("*gate_proj", "*up_proj", "*down_proj", "*gate_up_proj"),
)
DIT_MLP_LINEARS = ("*ff.net.0.proj", "*ff.net.2")  # GR00T DiT feed-forward (diffusers naming)
NEVER = ("*vision*", "*visual*", "*multi_modal_projector*", "*embed*", "*norm*", "lm_head", "*.lm_head")


def layout_targets(dit_attention: bool = False, dit_patterns: Sequence[str] = DIT_PATTERNS) -> Targets:
    """The paper's layout: every language-backbone linear, DiT MLP only (DiT attention stays FP)."""
    exclude = list(NEVER)
    if not dit_attention:
        # attention linears inside the action expert, whatever the attention module is called
        exclude += [f"{p}{a}*" for p in dit_patterns for a in ("attn", "to_q", "to_k", "to_v", "to_out")]
    return Targets(include=[*LLM_LINEARS, *DIT_MLP_LINEARS], exclude=exclude)
