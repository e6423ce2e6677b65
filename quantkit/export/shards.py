"""A streaming, sharded safetensors writer: tensors go to disk as they come.

Each tensor's bytes are appended to the current shard's data file at once; the shard's header
(names, dtypes, shapes, offsets) is written when the shard closes, at `max_shard_bytes` or at
the end. A whole state dict is never held. With more than one shard the files are named
`model-0000i-of-0000N.safetensors` and `model.safetensors.index.json` maps names to files, as
transformers writes them; with one, `model.safetensors` alone.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.stream.source import INDEX_FILE, SINGLE_FILE, TORCH_TO_ST

DEFAULT_MAX_SHARD = 5 * 1000**3  # 5 GB, transformers' default
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '64KiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in _UNITS or value <= 0:
        raise QuantkitError(f"invalid size {text!r}; use a byte count or e.g. 5GB, 500MB, 64KiB")
    return int(value * _UNITS[unit])


class ShardWriter:
    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD, *, shard_tag: str = ""):
        self.dir = Path(out_dir)
        self.max = max_shard_bytes
        self.tag = shard_tag  # distinguishes the shard files of several writers into one dir (ranks)
        self.shards: list[tuple[Path, dict[str, dict]]] = []  # (final temp name, header) per closed shard
        self._data = None
        self._header: dict[str, dict] = {}
        self._offset = 0
        self.total_bytes = 0
        self.names: set[str] = set()

    def _open(self) -> None:
        path = self.dir / f".shard{self.tag}-{len(self.shards):05d}.data"
        self._data = open(path, "wb")
        self._data_path = path
        self._header, self._offset = {}, 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise QuantkitError(f"internal: tensor {name} written twice")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype not in TORCH_TO_ST:
            raise QuantkitError(f"{name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        if self._data is not None and self._offset and self._offset + nbytes > self.max:
            self._close_shard()
        if self._data is None:
            self._open()
        if nbytes:
            flat = t.reshape(-1)
            if flat.stride(0) != 1:  # a one-element view keeps its odd stride through contiguous()
                flat = flat.clone(memory_format=torch.contiguous_format)
            self._data.write(flat.view(torch.uint8).numpy())
        self._header[name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total_bytes += nbytes
        self.names.add(name)

    def _close_shard(self) -> None:
        self._data.close()
        path = self._data_path.with_suffix(".safetensors")
        header = {"__metadata__": {"format": "pt"}, **self._header}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
        os.remove(self._data_path)
        self.shards.append((path, self._header))
        self._data = None

    def close(self) -> list[tuple[str, dict[str, dict]]]:
        """Close the last shard; -> [(temp shard path, header)] for finalize()."""
        if self._data is not None:
            self._close_shard()
        return [(str(p), h) for p, h in self.shards]


def finalize(out_dir: str | Path, shards: list[tuple[str, dict[str, dict]]], total_bytes: int) -> list[str]:
    """Name the shards transformers' way and write the index when there are several."""
    out_dir = Path(out_dir)
    n = len(shards)
    if n == 0:
        raise QuantkitError("internal: no tensors were written")
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for (tmp, header), final in zip(shards, names):
        os.replace(tmp, out_dir / final)
        weight_map.update({k: final for k in header})
    if n > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
