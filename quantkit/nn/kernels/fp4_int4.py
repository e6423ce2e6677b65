"""FP4 (NVFP4/MXFP4) weight-only decode on torch's CPU INT4 kernel, K doubled ("int4x2").

No torch CPU kernel takes E2M1 weights, but twice an E2M1 value is a small integer
(2 * {0, .5, 1, 1.5, 2, 3, 4, 6} = {0, 1, 2, 3, 4, 6, 8, 12}, with sign) and every such v2 is the
sum of two INT4 values a + b in [-6, 6]. So, per FP4 block of B elements with divisor d:

    sum_k x_k * e2m1_k * d  =  sum_k x_k * a_k * (d/2)  +  sum_k x_k * b_k * (d/2)

which is one `_weight_int4pack_mm_for_cpu` call over 2K inputs: each block becomes one INT4 group
of 2B elements ([a-block | b-block], scale d/2, zero 0) and the input block is repeated
([x-block | x-block]). NVFP4 (B=16) uses group 32, MXFP4 (B=32) group 64.

Cost: the kernel reads one byte per weight (vs half a byte packed, two bytes bf16) and does twice
the int4 work; measured 0.6-0.7x of a bf16 GEMV at one row (docs/runtime.md). Memory: the
converted codes replace the canonical ones (`unpack` gives them back bit for bit, for export and
the tiled prefill path) but are twice their size, plus the kernel's [groups, out, 2] scale table;
that is over the "packed size + one tile" budget, so this route is opt-in (select.FP4_DECODE_ENV).

Split: a = sign * ceil(|v2|/2), b = sign * floor(|v2|/2); a negative zero (code 8) is stored as
a = -1, b = +1 (sum 0, and a pair no other code uses), so the inverse is exact for all 16 codes.
"""

from __future__ import annotations

import torch

from quantkit.formats import e2m1
from quantkit.formats.int4 import INT4_OFFSET  # torch's kernel reads a nibble n as n - 8, as stored
from quantkit.nn.kernels import int4 as k_int4

_V2 = (0, 1, 2, 3, 4, 6, 8, 12)  # 2 * E2M1 magnitude of code index 0..7
CONVERT_ROWS = 1024  # rows converted per chunk (a multiple of every kernel BLOCK_N: 32, 64)


def _split_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[16] a-nibble and b-nibble per E2M1 code, and [256] code per (a-nibble << 4 | b-nibble)."""
    a_nib, b_nib = [], []
    for code in range(16):
        v2 = _V2[code & 7]
        sign = -1 if code & 8 else 1
        a, b = (-1, 1) if code == 8 else (sign * ((v2 + 1) // 2), sign * (v2 // 2))
        a_nib.append(a + INT4_OFFSET)
        b_nib.append(b + INT4_OFFSET)
    inverse = torch.zeros(256, dtype=torch.uint8)  # pairs never produced stay 0 (unreachable)
    for code in range(16):
        inverse[a_nib[code] << 4 | b_nib[code]] = code
    return torch.tensor(a_nib, dtype=torch.int32), torch.tensor(b_nib, dtype=torch.int32), inverse


A_NIBBLE, B_NIBBLE, CODE_OF_PAIR = _split_tables()


def group_size(block: int) -> int:
    """INT4 group that holds one FP4 block's a and b halves."""
    return 2 * block


def split_nibbles(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Canonical packed FP4 codes uint8 [out, in/2] -> INT4 nibbles int32 [out, 2*in] (0..15).

    Each block of `block` inputs becomes [a nibbles | b nibbles] (2*block columns).
    """
    c = e2m1.unpack(codes).long()  # [out, in] codes 0..15
    rows, cols = c.shape
    a = A_NIBBLE.to(c.device)[c].view(rows, cols // block, block)  # [out, nb, B]
    b = B_NIBBLE.to(c.device)[c].view(rows, cols // block, block)
    return torch.cat([a, b], dim=2).reshape(rows, 2 * cols)  # [out, nb, 2B] -> [out, 2*in]


def pack(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Canonical FP4 codes [out, in/2] -> torch's CPU int4 layout of the split weight, uint8 [out, in].

    Converted in chunks of CONVERT_ROWS rows so the int32 temporary stays bounded; chunks that are
    multiples of the kernel's row block concatenate to the whole-matrix layout (tested).
    """
    out_f = codes.shape[0]
    parts = []
    for r0 in range(0, out_f, CONVERT_ROWS):
        nib = split_nibbles(codes[r0 : r0 + CONVERT_ROWS], block)
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib, 1).reshape(-1))
    return torch.cat(parts).view(out_f, -1) if len(parts) > 1 else parts[0].view(out_f, -1)


def unpack(packed: torch.Tensor, out_features: int, in_features: int, block: int) -> torch.Tensor:
    """The exact inverse of `pack`: canonical packed FP4 codes uint8 [out, in/2]."""
    per_row = packed.numel() // out_features  # in_features bytes: 2*in nibbles
    parts = []
    for r0 in range(0, out_features, CONVERT_ROWS):
        r1 = min(out_features, r0 + CONVERT_ROWS)
        chunk = packed.reshape(-1)[r0 * per_row : r1 * per_row]
        nib = k_int4._unpack(chunk, r1 - r0, 2 * in_features, k_int4.cpu_layout())  # [rows, 2*in]
        pairs = nib.view(r1 - r0, in_features // block, 2, block)  # [rows, nb, a|b, B]
        key = (pairs[:, :, 0].long() << 4) | pairs[:, :, 1].long()
        parts.append(e2m1.pack(CODE_OF_PAIR.to(packed.device)[key].reshape(r1 - r0, in_features)))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def scales_and_zeros(divisor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 block divisors [out, nb] -> the kernel's [nb, out, 2] table of (d/2, 0) in dtype."""
    return k_int4.scales_and_zeros(divisor * 0.5, dtype)  # d/2: exact in fp32 (a power-of-two step)


def expand_input(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [T, in] -> [T, 2*in]: each block of inputs repeated, matching split_nibbles' columns."""
    t, k = x.shape
    xb = x.reshape(t, k // block, block)  # [T, nb, B]
    return torch.cat([xb, xb], dim=2).reshape(t, 2 * k)


def fp4_int4x2_linear(x: torch.Tensor, packed: torch.Tensor, block: int, sz: torch.Tensor, module) -> torch.Tensor:
    """x [T, in] -> [T, out] in x.dtype (bias and output_scale as int4_linear)."""
    return k_int4.int4_linear(expand_input(x, block), packed, group_size(block), sz, module)
