"""The isolation-sweep engine behind `quantkit sensitivity`: one model in memory, many runs.

Each run fake-quantizes a set of linears, measures the model against a reference pass, and puts
the original weights back. Three things keep a full sweep cheap:

- every target linear is fake-quantized once per format up front; a run only swaps the weight
  tensor (``param.data``) and swaps the original object back, so restoring is bit-exact;
- the reference pass keeps compact outputs (top-k log-probs plus the tail mass, or the full
  distribution for small vocabularies) instead of a second model;
- the reference pass also records each decoder layer's output, so a run whose first quantized
  module sits in block b replays blocks 0..b-1 from that record instead of recomputing them
  (their inputs and weights are unchanged, so the replayed tensors are exactly what they would
  compute).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.analysis.diagnostics import ACT_OUTLIER_THRESHOLD
from quantkit.arch import ArchInfo
from quantkit.errors import FormatError, QuantkitError
from quantkit.formats import Format

FULL_VOCAB_MAX = 8192  # keep the whole reference distribution up to this vocabulary size
TOPK = 1024  # reference log-probs kept per token above it; the rest is one "tail" bucket (SmolLM2 ALL
# nvfp4 run, 512 tokens: KL 97.8% of the full-vocabulary value at 1024, 93.7% at 256, 99.5% at 4096)
REPLAY_MAX_BYTES = 4 << 30  # skip the layer-output record when it would exceed 4 GiB
TAIL_FLOOR = 1e-30  # keeps log(tail mass) finite when top-k holds all of it


Swaps = list[str] | dict[str, tuple[torch.Tensor, Format | None]]


@dataclass
class RunMetrics:
    ppl: float
    kl: float
    seconds: float
    first_layer: int  # blocks before it were replayed, not computed


@dataclass
class _RefBatch:
    logp: torch.Tensor  # [b, T, V] full, or [b, T, K] top-k log-probs
    index: torch.Tensor | None  # [b, T, K] vocabulary ids of the top-k, None when full
    log_tail: torch.Tensor | None  # [b, T] log of the reference mass outside the top-k


def fake_weights(
    model: nn.Module, names: list[str], fmt: Format, fused: list[list[str]]
) -> dict[str, torch.Tensor]:
    """Fake-quantized fp32 weight per linear; fused groups share one global scale, as vLLM needs."""
    group_of = {n: g for g in fused for n in g if all(m in names for m in g)}
    shared: dict[tuple[str, ...], torch.Tensor | None] = {}
    out = {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        group = tuple(group_of.get(name, [name]))
        if group not in shared:
            scales = [fmt.weight_global_scale(model.get_submodule(n).weight.detach().float()) for n in group]
            shared[group] = None if scales[0] is None else torch.stack([s.reshape(()) for s in scales]).min()
        gs = shared[group]
        try:
            q = fmt.quantize(w.float(), global_scale=None if gs is None else gs.reshape(1))
        except FormatError as e:
            raise FormatError(f"{name}: {e}") from None
        out[name] = fmt.dequantize(q, torch.float32).to(w.dtype)
    return out


class Sweep:
    """Holds the reference outputs and runs isolated quantization experiments on one model."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchInfo,
        fmt: Format,
        tokens: torch.Tensor,  # [N, T] token windows
        names: list[str],  # every linear a run may quantize
        *,
        act_quant: bool,
        batch_size: int = 4,
        replay: bool = True,
        moe: dict[str, tuple[int, str]] | None = None,  # experts modules and routers -> (block, role)
    ):
        self.model, self.arch, self.fmt, self.tokens = model, arch, fmt, tokens
        self.moe = dict(moe or {})
        self.names = [*names, *(n for n in self.moe if n not in names)]
        self.act_quant = act_quant
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.layers = arch.layers(model)
        hidden = tokens.numel() * arch.hidden_size * 4 * max(len(self.layers) - 1, 0)
        self.replay = replay and hidden <= REPLAY_MAX_BYTES
        self.ref: list[_RefBatch] = []
        self.layer_out: list[list[torch.Tensor]] = []  # [batch][layer] -> [b, T, H]
        self.act_outliers: dict[str, float] = {}
        self.ppl_fp = math.nan
        self._tuple_out = False  # set by the reference pass when layers return tuples
        self.fake = fake_weights(model, [n for n in self.names if self.moe.get(n, (0, ""))[1] != "experts"], fmt,
                                 self._fused_all())
        self.fake.update(self._fake_experts())

    def _fake_experts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Experts module -> {3-D parameter: per-expert fake-quantized weights} (QExperts' numerics)."""
        from quantkit.nn.qexperts import fake_quantized_experts

        return {n: fake_quantized_experts(self.model.get_submodule(n), self.fmt.name, self.arch.hidden_size)
                for n, (_, role) in self.moe.items() if role == "experts"}

    def where(self, name: str) -> tuple[int, str] | None:
        return self.moe.get(name) or self.arch.role_of(name)

    def _fused_all(self) -> list[list[str]]:
        return [g for b in range(len(self.layers)) for g in self.arch.fused_groups(b)]

    def _batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for i, start in enumerate(range(0, self.tokens.shape[0], self.batch_size)):
            yield i, self.tokens[start : start + self.batch_size].to(self.device)

    # -- reference ---------------------------------------------------------------------------

    @torch.inference_mode()
    def reference(self) -> float:
        """Run the unmodified model once; keep compact outputs, layer outputs, activation stats."""
        counts = {n: [0, 0] for n in self.names}  # name -> [elements above threshold, elements]
        hooks = [
            self.model.get_submodule(n).register_forward_pre_hook(self._count_hook(counts[n])) for n in self.names
        ]
        current: list[torch.Tensor] = []
        if self.replay:
            for layer in self.layers[:-1]:
                hooks.append(layer.register_forward_hook(lambda m, a, out: current.append(self._hidden(out).clone())))
        nll = n_tok = 0.0
        try:
            for _, ids in self._batches():
                current.clear()
                logits = self.model(input_ids=ids, use_cache=False).logits.float()
                logp = torch.log_softmax(logits, dim=-1)
                del logits
                nll += _nll_sum(logp, ids)
                n_tok += ids[:, 1:].numel()
                self.ref.append(_compact(logp))
                if self.replay:
                    self.layer_out.append(list(current))
        finally:
            for h in hooks:
                h.remove()
        self.act_outliers = {n: c[0] / max(c[1], 1) for n, c in counts.items()}
        self.ppl_fp = math.exp(nll / n_tok)
        return self.ppl_fp

    @staticmethod
    def _count_hook(slot: list[int]):
        def hook(module, args):
            x = args[0]
            slot[0] += int((x.abs() > ACT_OUTLIER_THRESHOLD).sum())
            slot[1] += x.numel()

        return hook

    # -- one run -----------------------------------------------------------------------------

    @contextmanager
    def quantized(self, modules: Swaps):
        """Swap in fake-quantized weights (and activation quantizers) for `modules`; restore after.

        `modules` is a list of names (this sweep's format) or name -> (replacement weight, format
        whose activation quantizer the input gets in w4a4 mode; None for none). An experts
        module's replacement is {3-D parameter: weights}; in w4a4 mode its input (the hidden
        states every expert reads) is quantized, the down projections' inputs are not.
        """
        swaps = modules if isinstance(modules, dict) else {n: (self.fake[n], self.fmt) for n in modules}
        originals, hooks = [], []  # (parameter, its original data)
        try:
            for name, (w, fmt) in swaps.items():
                module = self.model.get_submodule(name)
                for leaf, t in (w.items() if isinstance(w, dict) else [("weight", w)]):
                    param = getattr(module, leaf)
                    originals.append((param, param.data))
                    param.data = t
                if self.act_quant and fmt is not None:
                    hooks.append(module.register_forward_pre_hook(_act_hook(fmt)))
            yield
        finally:
            for h in hooks:
                h.remove()
            for param, data in originals:
                param.data = data

    def first_layer(self, modules) -> int:
        layers = [where[0] for n in modules if (where := self.where(n)) is not None]
        if len(layers) < len(list(modules)):
            return 0  # a non-block module (e.g. lm_head) changes everything downstream of the embedding
        return min(layers, default=0)

    @torch.inference_mode()
    def measure(self, modules: Swaps) -> RunMetrics:
        if not self.ref:
            raise QuantkitError("Sweep.measure called before Sweep.reference")
        start = time.perf_counter()
        first = self.first_layer(modules) if self.replay else 0
        nll = kl = n_nll = n_kl = 0.0
        with self.quantized(modules):
            for i, ids in self._batches():
                with self._replaying(i, first):
                    logits = self.model(input_ids=ids, use_cache=False).logits.float()
                logq = torch.log_softmax(logits, dim=-1)
                del logits
                nll += _nll_sum(logq, ids)
                n_nll += ids[:, 1:].numel()
                kl += _kl_sum(self.ref[i], logq)
                n_kl += ids.numel()
        return RunMetrics(math.exp(nll / n_nll), kl / n_kl, time.perf_counter() - start, first)

    @contextmanager
    def _replaying(self, batch: int, first: int):
        """Make decoder layers < first return their recorded output instead of computing."""
        patched = []
        try:
            for j in range(first):
                layer = self.layers[j]
                recorded = self.layer_out[batch][j]
                layer.forward = _replay_forward(recorded, self._tuple_out)
                patched.append(layer)
            yield
        finally:
            for layer in patched:
                del layer.forward  # drop the instance attribute; the class method shows again

    def _hidden(self, out) -> torch.Tensor:
        # decoder layers return a tensor (transformers >= 5) or a tuple led by it (older / remote code)
        if isinstance(out, tuple):
            self._tuple_out = True
            return out[0]
        return out


def _act_hook(fmt: Format):
    def hook(module, args):
        # dynamic per-tensor global scale (spec §3.2): the format derives it from this input
        return (fmt.fake_activation(args[0], None), *args[1:])

    return hook


def _replay_forward(recorded: torch.Tensor, as_tuple: bool):
    def forward(*args, **kwargs):
        return (recorded,) if as_tuple else recorded

    return forward


def _nll_sum(logp: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL: position t predicts token t + 1."""
    return float(-logp[:, :-1].gather(-1, ids[:, 1:, None]).sum())


def _compact(logp: torch.Tensor) -> _RefBatch:
    if logp.shape[-1] <= FULL_VOCAB_MAX:
        return _RefBatch(logp.clone(), None, None)
    top, index = logp.topk(TOPK, dim=-1)  # [b, T, K]
    tail = (1.0 - top.exp().sum(-1)).clamp_min(TAIL_FLOOR)
    return _RefBatch(top.contiguous(), index.to(torch.int32), tail.log())


def _kl_sum(ref: _RefBatch, logq: torch.Tensor) -> float:
    """Summed KL(p_ref || q) over tokens.

    With a compact reference, the distributions are coarsened to top-k ids plus one tail bucket;
    by the data-processing inequality this is a lower bound on the full KL, exact up to the
    reference mass outside the top-k.
    """
    if ref.index is None:
        return float((ref.logp.exp() * (ref.logp - logq)).sum())
    q_top = logq.gather(-1, ref.index.long())  # [b, T, K]
    p_top = ref.logp.exp()
    kl_top = (p_top * (ref.logp - q_top)).sum(-1)
    q_tail = (1.0 - q_top.exp().sum(-1)).clamp_min(TAIL_FLOOR).log()
    kl_tail = ref.log_tail.exp() * (ref.log_tail - q_tail)
    return float((kl_top + kl_tail).sum())
