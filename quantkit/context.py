"""Context: everything passes share during one pipeline run."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from quantkit.arch import ArchInfo


@dataclass
class Context:
    model: nn.Module
    tokenizer: Any
    arch: ArchInfo
    device: torch.device
    # calibration token ids [N, seq_len], or a caller's batches (list, see given_calib); None until
    # the calibrate pass ran
    calib: torch.Tensor | list | None = None
    batch_size: int = 4
    seed: int = 0
    # per-module statistics, e.g. stats["act_amax"][name] -> tensor
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    provided: set[str] = field(default_factory=set)
    # facts that passes still to run require (set by the pipeline before each pass)
    needed: set[str] = field(default_factory=set)
    # rows that end up in report.json under "passes" -> pass name -> dict
    report: dict[str, Any] = field(default_factory=dict)
    teacher: nn.Module | None = None
    # modules a pass replaced, name -> description (for the report and export)
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the recipe's calib section (quantkit.recipe.CalibConfig)
    calib_config: Any = None
    # advance the current pass's progress bar by n work units (set by the pipeline)
    progress: Callable[[int], None] | None = None
    # per-run state of the passes, by pass name (passes themselves are frozen configuration)
    scratch: dict[str, Any] = field(default_factory=dict)
    # where the weights live: quantkit.stream.residency.WholeResidency / StreamResidency (None = whole)
    residency: Any = None
    # facts that passes in later stages require (set by the pipeline)
    needed_later: set[str] = field(default_factory=set)
    # calibration batches from the caller (a --loader): each input_ids [b, s] or a dict of forward
    # kwargs; the calibrate pass uses them instead of the recipe's calib data (docs/loaders.md)
    given_calib: list | None = None

    def keep_teacher(self) -> None:
        """Snapshot the unmodified model once, for passes that compare against it."""
        if self.teacher is None:
            self.teacher = copy.deepcopy(self.model).eval()

    def calib_batches(self):
        """Yield calibration batches [b, seq_len] on the model's device."""
        if self.calib is None:
            raise RuntimeError("calibration buffer missing: the recipe order check should have caught this")
        if isinstance(self.calib, list):  # the caller's batches, as given
            for batch in self.calib:
                yield ({k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                       if isinstance(batch, dict) else batch.to(self.device))
            return
        for i in range(0, self.calib.shape[0], self.batch_size):
            yield self.calib[i : i + self.batch_size].to(self.device)

    def record(self, pass_name: str, **values: Any) -> None:
        self.report.setdefault(pass_name, {}).update(values)
