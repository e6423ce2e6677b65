"""INT4 weight-only on torch's CPU kernel (_weight_int4pack_mm_for_cpu).

torch computes w = (nibble - 8) * scale + zero per group, which is quantkit's (and
compressed-tensors') symmetric INT4 with zero = 0, since quantkit stores nibble = q + 8.
The kernel wants its own nibble layout ([out, in/2] uint8, the same size as the canonical codes).
A QLinear converts its codes once, on the first forward that runs this kernel, and then keeps only
the kernel's copy: `unpack_from_cpu` gives the canonical codes back, bit for bit, for export,
state_dict and the tiled prefill path (one transient layer-sized buffer, not a second resident copy).

torch's layout (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel): output
rows in blocks of BLOCK_N (64 on AVX512, 32 on AVX2 and without vector units), each block stored
[K, nb/2] bytes. A full block on AVX2/AVX512 puts row c in the low nibble of byte column c and
row c + BLOCK_N/2 in its high nibble ("split"); a partial block, or every block without vector
units, puts rows 2c and 2c+1 in byte column c ("pairs"). Which one this process's kernel uses is
found once by a round trip on a small probe rather than assumed from the CPU flags.
"""

from __future__ import annotations

import functools

import torch

from quantkit.formats import e2m1

# (how full blocks are stored, BLOCK_N) candidates, tried on a probe in this order
_LAYOUTS = (("split", 32), ("split", 64), ("pairs", 32), ("pairs", 64))
# 192 rows: full blocks for either BLOCK_N; 48 rows: a partial block after 32, or only a partial 64
_PROBE_ROWS = (192, 48)


def pack_for_cpu(codes: torch.Tensor) -> torch.Tensor:
    """Canonical packed nibbles uint8 [out, in/2] -> torch's CPU int4 layout uint8 [out, in/2]."""
    nibbles = e2m1.unpack(codes).to(torch.int32)  # [out, in] in 0..15
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)


def _block_rows(block: torch.Tensor, kind: str) -> torch.Tensor:
    """One block's bytes [K, nb/2] -> its nibbles [nb, K] (uint8, 0..15)."""
    lo, hi = block & 15, block >> 4  # [K, nb/2] each
    if kind == "split":
        return torch.cat([lo, hi], dim=1).t()  # rows 0..nb/2-1 low, nb/2..nb-1 high
    return torch.stack([lo, hi], dim=-1).reshape(block.shape[0], -1).t()  # row 2c low, 2c+1 high


def _unpack(packed: torch.Tensor, out_features: int, in_features: int, layout: tuple[str, int]) -> torch.Tensor:
    """torch's CPU int4 bytes -> nibbles [out, in] (uint8) for a given (kind, BLOCK_N)."""
    kind, block_n = layout
    flat = packed.reshape(-1)
    full = out_features // block_n
    parts = []
    if full:
        blocks = flat[: full * block_n * in_features // 2].view(full, in_features, block_n // 2)  # [NB, K, BN/2]
        lo, hi = blocks & 15, blocks >> 4
        if kind == "split":
            rows = torch.cat([lo, hi], dim=2)  # [NB, K, BN]: column j is row j of the block
        else:
            rows = torch.stack([lo, hi], dim=-1).reshape(full, in_features, block_n)
        parts.append(rows.transpose(1, 2).reshape(full * block_n, in_features))
    tail = out_features - full * block_n
    if tail:  # a partial block is always stored as pairs
        rest = flat[full * block_n * in_features // 2:].view(in_features, tail // 2)
        parts.append(_block_rows(rest, "pairs"))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@functools.cache
def cpu_layout() -> tuple[str, int]:
    """The (kind, BLOCK_N) this process's _convert_weight_to_int4pack_for_cpu writes."""
    gen = torch.Generator().manual_seed(0)
    probes = []
    for rows in _PROBE_ROWS:
        nibbles = torch.randint(0, 16, (rows, 32), generator=gen, dtype=torch.int32)
        probes.append((nibbles, torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)))
    for layout in _LAYOUTS:
        if all(torch.equal(_unpack(p, n.shape[0], 32, layout).to(torch.int32), n) for n, p in probes):
            return layout
    raise RuntimeError("internal: torch's CPU int4 weight layout is not one quantkit knows how to unpack")


def unpack_from_cpu(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """torch's CPU int4 layout -> canonical packed codes uint8 [out, in/2] (the exact inverse of pack_for_cpu)."""
    return e2m1.pack(_unpack(packed, out_features, in_features, cpu_layout()))


def scales_and_zeros(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-group scales [out, in/group] -> torch's [in/group, out, 2] (scale, zero=0)."""
    s = scale.reshape(scale.shape[0], -1).t().to(dtype)  # [ngroups, out]
    return torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def int4_linear(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor, module) -> torch.Tensor:
    """x [T, in] -> [T, out] in x.dtype."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    if module.output_scale is not None:
        y = y * module.output_scale.to(y.dtype)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y
