"""The streaming shard writer: files safetensors reads back exactly, sharding, odd tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from quantkit.errors import QuantkitError
from quantkit.export.shards import ShardWriter, finalize, parse_size
from quantkit.stream.source import SafetensorsSource


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.fp32": torch.randn(7, generator=g),
        "c.u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=g),
        "d.e4m3": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "e.i64": torch.tensor([3, -1]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
        "h.bool": torch.tensor([True, False, True]),
        "i.odd_stride": torch.zeros(4)[::2][:1] + 1.5,  # one element, stride 2
        "j.transposed": torch.arange(6.0).reshape(2, 3).t(),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("max_bytes", [10**9, 48])
def test_written_shards_read_back_exactly_with_safetensors(tmp_path, max_bytes):
    tensors = _tensors()
    w = ShardWriter(tmp_path, max_bytes)
    for name, t in tensors.items():
        w.add(name, t)
    names = finalize(tmp_path, w.close(), w.total_bytes)
    assert (len(names) == 1) == (max_bytes == 10**9)
    got = {}
    for f in names:
        with safe_open(tmp_path / f, "pt") as st:
            got.update({k: st.get_tensor(k) for k in st.keys()})
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert _same(got[name], t), name
    src = SafetensorsSource(tmp_path)  # quantkit's own lazy reader agrees
    for name, t in tensors.items():
        assert _same(src.read(name), t), name
    if len(names) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert not list(tmp_path.glob(".shard*"))


def test_a_name_written_twice_is_refused(tmp_path):
    w = ShardWriter(tmp_path)
    w.add("x", torch.zeros(2))
    with pytest.raises(QuantkitError, match="written twice"):
        w.add("x", torch.zeros(2))


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("64KiB", 65536), ("123", 123)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "five", "-1GB", "3XB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(QuantkitError, match="invalid size"):
        parse_size(text)
