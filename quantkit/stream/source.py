"""Lazy tensors from a checkpoint's safetensors shards: read one tensor at a time, no mmap.

The header of each shard is parsed once; a tensor is read with one seek + readinto into a
freshly allocated torch buffer, so resident memory is exactly the tensors held by the caller
(an mmap'd shard would count its touched pages in RSS until unmapped).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import ModelLoadError

# safetensors dtype names -> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict, int]:
    """-> (header dict, absolute offset where tensor data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelLoadError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ModelLoadError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    return header, 8 + n


class SafetensorsSource:
    """Every tensor of a model directory's safetensors files, by name, read on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        files = self._files()
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            header, start = read_header(file)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                if info["dtype"] not in ST_DTYPES:
                    raise ModelLoadError(f"{file.name}: tensor {name} has unsupported dtype {info['dtype']}")
                b, e = info["data_offsets"]
                self.entries[name] = TensorEntry(file, ST_DTYPES[info["dtype"]], tuple(info["shape"]), start + b, start + e)

    def _files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [self.dir / f for f in sorted(set(weight_map.values()))]
        single = self.dir / SINGLE_FILE
        if single.exists():
            return [single]
        found = sorted(self.dir.glob("*.safetensors"))
        if not found:
            raise ModelLoadError(f"{self.dir} has no safetensors weights (streaming reads safetensors only)")
        return found

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=e.dtype)
        if e.nbytes:
            buf = out.reshape(-1).view(torch.uint8).numpy()
            with open(e.file, "rb") as f:
                f.seek(e.begin)
                if f.readinto(buf) != e.nbytes:
                    raise ModelLoadError(f"{e.file.name}: tensor {name} is truncated")
        return out
