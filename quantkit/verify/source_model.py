"""The unquantized model of `verify --source`, read at most once per verify run.

The layer comparison needs the source's tensors by name, the evaluation needs it as a model. A
model directory's safetensors are read one tensor at a time as the comparison asks for them
(quantkit.stream's SafetensorsSource), so the whole source never sits in memory for it. A GGUF
file or hub id has no such files: it is loaded as a model once, and both checks use that model.
"""

from __future__ import annotations

from pathlib import Path

import torch


class SourceModel:
    def __init__(self, spec: str):
        from quantkit.models import resolve_model_path
        from quantkit.stream.source import SafetensorsSource

        self.spec = spec
        target = Path(resolve_model_path(spec))
        on_disk = target.is_dir() and any(target.glob("*.safetensors"))
        self._files = SafetensorsSource(target) if on_disk else None
        self._model = self._tok = None
        self._params: dict[str, torch.Tensor] | None = None

    def tensor(self, name: str) -> torch.Tensor | None:
        """The source's tensor `name` as stored (directory) or as loaded (GGUF, hub id); None if absent."""
        if self._files is not None:
            return self._files.read(name) if name in self._files else None
        if self._params is None:
            model, _ = self.model()
            self._params = {k: v.detach() for k, v in model.state_dict().items()}
        return self._params.get(name)

    def model(self):
        """-> (model, tokenizer), loaded on the first call only."""
        if self._model is None:
            from quantkit.models import load_model

            self._model, self._tok = load_model(self.spec, dtype="auto")
        return self._model, self._tok

    def release(self) -> None:
        """Drop the loaded model, so that the checkpoint is the only model in memory when it loads."""
        self._model = self._tok = self._params = None
