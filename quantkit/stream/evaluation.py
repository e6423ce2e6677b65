"""Before/after perplexity and KL in the same stream as the passes, with no copy of the model.

The held-out windows' hidden states run through each block twice: through the block as loaded
(the reference stream, before any pass touched it) and through the finished block (the
quantized stream). Only hidden states are held, never a second set of weights. At the end the
model's own tail (final norm, head) turns both streams into logits, window by window: the
perplexity of each stream and the exact mean token KL(reference || quantized) over every
position, on text no pass has seen.

On a CPU the streams compute in fp32 by default (`eval.compute_dtype: auto`): a 16-bit model's
weights are viewed in fp32 for the duration of one block's evaluation call and the original
tensors are put back untouched, so the passes and the writer see exactly the loaded weights.
Every bf16 value is exact in fp32, so this measures the same model with less rounding in the
arithmetic, and CPUs without native bf16 matmuls (AVX2) run it 3-8x faster.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.eval import kl_sum, nll_sum
from quantkit.stream.capture import capture, head_logits, run_block
from quantkit.targets import set_module

# evaluation is sized so that windows x tokens x parameters stays near SmolLM2-135M with 16
# windows of 512 tokens (8k tokens: the before/after difference on the same tokens is far less
# noisy than either perplexity); a 7B model gets a few windows instead of hours of CPU time
EVAL_TOKEN_PARAM_BUDGET = 16 * 512 * 135e6
MIN_EVAL_WINDOWS = 2
_HALF = (torch.bfloat16, torch.float16)


def window_count(ev, n_params: int) -> int | None:
    """The recipe's eval.max_windows when the user set it (their cost to choose, printed up front),
    else the default capped by the token x parameter budget."""
    if "max_windows" in ev.model_fields_set:
        return ev.max_windows
    cap = max(MIN_EVAL_WINDOWS, int(EVAL_TOKEN_PARAM_BUDGET // (ev.seq_len * max(n_params, 1))))
    return cap if ev.max_windows is None else min(ev.max_windows, cap)


def compute_dtype_for(setting: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """auto: fp32 arithmetic for a 16-bit model on a CPU, the model's own dtype elsewhere."""
    if setting == "float32" or (setting == "auto" and device.type == "cpu" and model_dtype in _HALF):
        return torch.float32
    return model_dtype


@contextmanager
def viewed_as(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> Iterator[None]:
    """Give the 16-bit floating tensors among these `dtype` data for a while, then their own back.

    The original storage is kept and reattached, so nothing is rounded on the way back (a cast
    back would round fp32 buffers such as rotary tables, and would cost a second copy)."""
    saved = []
    for t in tensors:
        if t.dtype in _HALF and t.dtype != dtype and t.device.type != "meta":
            saved.append((t, t.data))
            t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t, data in saved:
            t.data = data


def _cast(value, dtype: torch.dtype, done: dict[int, torch.Tensor]):
    """A block call's arguments with their 16-bit floating tensors (rotary tables, additive masks)
    in dtype; `done` maps tensors already cast, so a table every block shares is cast once."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _HALF:
            return value
        if id(value) not in done:
            done[id(value)] = value.to(dtype)
        return done[id(value)]
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype, done) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype, done) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype, done) for k, v in value.items()}
    return value


def _block_tensors(block: nn.Module) -> list[torch.Tensor]:
    return [*block.parameters(), *block.buffers()]


class SideBySide:
    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], windows: torch.Tensor, batch_size: int,
                 device: torch.device, kl: bool = True, compute_dtype: torch.dtype | None = None):
        batches = [windows[i : i + batch_size].to(device) for i in range(0, windows.shape[0], batch_size)]
        cap = capture(model, blocks, batches)
        self.model, self.blocks, self.kl = model, blocks, kl
        self.dtype = compute_dtype or cap.hidden[0].dtype
        self.ids = cap.ids
        done: dict[int, torch.Tensor] = {}  # the captured tensors stay alive meanwhile, so ids are not reused
        self.calls = [[type(c)(_cast(c.args, self.dtype, done), _cast(c.kwargs, self.dtype, done)) for c in per_block]
                      for per_block in cap.calls]
        self.ref = [h.to(self.dtype) for h in cap.hidden]
        self.q = list(self.ref)
        # the head as loaded: a pass that quantizes lm_head (run after the blocks) replaces the
        # module, and the reference stream must still end in the original one. Holding the module
        # costs nothing unless it is replaced (then one head's weights, only in that case).
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = next(((n, m) for n, m in model.named_modules() if m is head), None) if head is not None else None

    def _replaced_head(self) -> nn.Module | None:
        """The head the model was loaded with, if a pass has since replaced it (else None)."""
        if self.head is None or self.model.get_submodule(self.head[0]) is self.head[1]:
            return None
        return self.head[1]

    @contextmanager
    def _head(self, module: nn.Module | None) -> Iterator[None]:
        """The model with `module` as its head for a while (None: as it is)."""
        if module is None:
            yield
            return
        current = self.model.get_submodule(self.head[0])
        set_module(self.model, self.head[0], module)
        try:
            yield
        finally:
            set_module(self.model, self.head[0], current)

    def reference(self, i: int, block: nn.Module) -> None:
        with viewed_as(_block_tensors(block), self.dtype):
            self.ref = run_block(block, self.ref, self.calls[i])

    def quantized(self, i: int, block: nn.Module) -> None:
        with viewed_as(_block_tensors(block), self.dtype):
            self.q = run_block(block, self.q, self.calls[i])

    def _tail_tensors(self) -> list[torch.Tensor]:
        """The model's tensors outside the decoder blocks (embeddings, final norm, head)."""
        inside = {id(t) for b in self.blocks for t in _block_tensors(b)}
        return [t for t in [*self.model.parameters(), *self.model.buffers()] if id(t) not in inside]

    @torch.inference_mode()
    def finish(self, progress: Callable[[int], None] | None = None) -> dict:
        original = self._replaced_head()  # the reference stream ends in it; viewed once, not per window
        extra = _block_tensors(original) if original is not None else []
        with viewed_as([*self._tail_tensors(), *extra], self.dtype):
            return self._finish(progress, original)

    def _finish(self, progress: Callable[[int], None] | None, original_head: nn.Module | None) -> dict:
        nll_ref = nll_q = kl = 0.0
        count = tokens = 0
        for ids, h_ref, h_q in zip(self.ids, self.ref, self.q):
            for j in range(ids.shape[0]):  # one window at a time: two [s, V] fp32 logit tensors at most
                one = ids[j : j + 1]
                with self._head(original_head):
                    lr = head_logits(self.model, self.blocks, one, h_ref[j : j + 1]).float()
                lq = head_logits(self.model, self.blocks, one, h_q[j : j + 1]).float()
                nll_ref += nll_sum(lr, one)
                nll_q += nll_sum(lq, one)
                count += one[:, 1:].numel()
                if self.kl:
                    kl += kl_sum(lr, lq)
                    tokens += one.numel()
                if progress:
                    progress(1)
        return {"ppl_before": math.exp(nll_ref / count), "ppl_after": math.exp(nll_q / count),
                "kl": kl / tokens if self.kl and tokens else None, "eval_tokens": count,
                "compute_dtype": str(self.dtype).removeprefix("torch.")}


class TopKReference:
    """Compact reference for KL when the passes need the whole model: top-k log-probs per position.

    KL(p || q) is computed over the reference's top-k tokens plus one bucket for the rest of the
    vocabulary; by the data-processing inequality this never exceeds the exact KL, and equals it
    when k is the vocabulary size.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, k: int = 1024, batch_size: int = 4):
        self.windows, self.k, self.batch_size = windows, k, batch_size
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.inference_mode():
            for ids, logp in self._logprobs(model):
                vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
                self.top.append((vals, idx))

    def _logprobs(self, model: nn.Module):
        dev = next(model.parameters()).device
        for i in range(0, self.windows.shape[0], self.batch_size):
            ids = self.windows[i : i + self.batch_size].to(dev)
            yield ids, F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)

    @torch.inference_mode()
    def kl(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        for (ids, logq), (lp, idx) in zip(self._logprobs(model), self.top):
            lq = logq.gather(-1, idx)
            p = lp.exp()
            head = (p * (lp - lq)).sum(-1)
            p_rest = (1 - p.sum(-1)).clamp_min(0)
            q_rest = (1 - lq.exp().sum(-1)).clamp_min(1e-30)
            tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), torch.zeros_like(p_rest))
            total += float((head + tail).sum())
            count += ids.numel()
        return total / count
