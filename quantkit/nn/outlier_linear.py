"""OutlierLinear: LLM.int8() vector-wise int8 with mixed-precision outlier decomposition.

Y = X[:, O] · W16[:, O]ᵀ + (c_x ⊗ c_w / 127²) ⊙ (X_i8 · W_i8ᵀ) (+ b)

- W_i8 = ``weight_int8`` [out, in]: row-wise absmax with the bitsandbytes divisor 127
  (``round(W * 127 / c_w)``), c_w = ``weight_absmax`` [out], fp32 (bitsandbytes' CB, SCB).
  There is deliberately no ``weight`` tensor: see docs/llm_int8.md (checkpoint guard).
- X_i8 [T, in]: per token (row) absmax, computed every forward, outlier columns zeroed.
- O: the outlier feature columns.
  * dynamic (the paper, bitsandbytes): every forward, columns with any ``|x| >= threshold``.
    The 16-bit weight of those columns is the dequantized int8 one, as in bitsandbytes
    with ``has_fp16_weights=False``: no second copy of W is kept.
  * static: a fixed column set chosen from calibration. Those weight columns are stored
    exactly in 16 bits (``outlier_weight`` [out, k]) and excluded from c_w, so the int8
    part quantizes the remaining columns only (the spec's W̃).
- The row scale c_x is the absmax over the non-outlier columns (paper). ``bnb_compat``
  reproduces bitsandbytes >= 0.45, which zeroes only the outlier *elements* before the row
  absmax, so entries below the threshold in outlier columns still count.

The int8 x int8 product accumulates exactly in int32 (``torch._int_mm`` on CPU and CUDA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import FormatError
from quantkit.nn.kernels import int8 as k_int8
from quantkit.nn.kernels import tiled
from quantkit.nn.kernels.select import Device

INT8_ABSMAX_DIVISOR = 127.0  # bnb / LLM.int8: codes in [-127, 127], never -128
INV_DIVISOR_SQ = 1.0 / (INT8_ABSMAX_DIVISOR * INT8_ABSMAX_DIVISOR)  # both operands' 1/127
DEFAULT_THRESHOLD = 6.0  # the paper's alpha; bitsandbytes' llm_int8_threshold
MIN_INT_MM_ROWS = 17  # torch._int_mm wants more than 16 rows on CUDA (and some CPU builds)
OUTLIER_MODES = ("dynamic", "static")
_HAS_INT_MM = hasattr(torch, "_int_mm")


def quantize_rows_absmax(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb row-wise int8: w [rows, cols] -> (codes int8 [rows, cols], absmax fp32 [rows])."""
    w32 = w.float()
    absmax = w32.abs().amax(dim=1)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)  # an all-zero row stays 0
    codes = torch.round(w32 * (INT8_ABSMAX_DIVISOR / safe)[:, None]).to(torch.int8)
    return codes, absmax


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 product a [T, k] int8 · b_t [k, n] int8 -> [T, n] int32."""
    rows = a.shape[0]
    if a.device.type == "cpu" and not Device.of("cpu").vnni:
        # without VNNI/AMX torch._int_mm is a scalar loop on CPU (50-70x slower than the fp32 GEMM,
        # docs/runtime.md); the codes multiply exactly on the fp32 GEMM in 2**24-safe K-chunks
        w = b_t.t()  # [n, k]
        acc = k_int8.int_gemm_exact_f32(a.to(torch.float32), w, tiled.tile_rows(*w.shape, torch.float32))
        return acc.to(torch.int32)
    if _HAS_INT_MM and (a.device.type == "cpu" or (a.shape[1] % 8 == 0 and b_t.shape[1] % 8 == 0)):
        if rows < MIN_INT_MM_ROWS:
            a = F.pad(a, (0, 0, 0, MIN_INT_MM_ROWS - rows))
        return torch._int_mm(a, b_t)[:rows]
    # fp64 holds every partial sum exactly up to k = 2**53 / 127**2
    return (a.double() @ b_t.double()).to(torch.int32)


class OutlierLinear(nn.Module):
    """LLM.int8() linear. Build with ``from_linear``; the empty constructor is for loading."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        outliers: str = "dynamic",
        n_static: int = 0,
        bnb_compat: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if outliers not in OUTLIER_MODES:
            raise FormatError(f"outliers must be one of {', '.join(OUTLIER_MODES)}, got {outliers!r}")
        if not threshold >= 0:  # also rejects NaN
            raise FormatError(f"LLM.int8 threshold must be >= 0 (inf disables outliers), got {threshold}")
        self.in_features, self.out_features = in_features, out_features
        self.threshold = float(threshold)
        self.outliers = outliers
        self.bnb_compat = bnb_compat
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_absmax", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("outlier_idx", torch.zeros(n_static, dtype=torch.int64, device=device))
        self.register_buffer("outlier_weight", torch.zeros(out_features, n_static, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        # filled during forward while track_stats is set: forwards seen, sum and max of |O|
        self.track_stats = False
        self.stats = {"forwards": 0, "outlier_cols_sum": 0, "outlier_cols_max": 0}

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        outliers: str = "dynamic",
        outlier_idx: torch.Tensor | None = None,
        bnb_compat: bool = False,
    ) -> OutlierLinear:
        """Quantize an nn.Linear (not modified). ``outlier_idx`` is required for static mode."""
        w = linear.weight.detach()
        dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32
        if outliers == "static":
            if outlier_idx is None:
                raise FormatError("static outliers need outlier_idx (columns found on calibration data)")
            idx = torch.as_tensor(outlier_idx, dtype=torch.int64, device=w.device).unique(sorted=True)
        else:
            idx = torch.zeros(0, dtype=torch.int64, device=w.device)
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            threshold=threshold,
            outliers=outliers,
            n_static=idx.numel(),
            bnb_compat=bnb_compat,
            dtype=dtype,
            device=w.device,
        )
        regular = w.clone()
        regular[:, idx] = 0  # static: c_w over W̃, the non-outlier columns only
        codes, absmax = quantize_rows_absmax(regular)
        mod.weight_int8.copy_(codes)
        mod.weight_absmax.copy_(absmax)
        mod.outlier_idx.copy_(idx)
        mod.outlier_weight.copy_(w[:, idx].to(dtype))
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach().to(dtype))
        return mod

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the 16-bit parts (bias, static outlier weights); follows model.to(dtype)."""
        return self.outlier_weight.dtype

    # -- runtime ---------------------------------------------------------------------------

    def _dequantized_columns(self, idx: torch.Tensor) -> torch.Tensor:
        """Dynamic outliers: 16-bit weight columns from the int8 codes, fp32 [out, k]."""
        return self.weight_int8[:, idx].float() * (self.weight_absmax / INT8_ABSMAX_DIVISOR)[:, None]

    def _outlier_columns(self, ax: torch.Tensor) -> torch.Tensor:
        """Indices of this forward's outlier columns, from |X| [T, in]."""
        if self.outliers == "static":
            return self.outlier_idx
        if math.isinf(self.threshold):
            return self.outlier_idx[:0]
        return torch.nonzero(ax.amax(dim=0) >= self.threshold).flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On a CPU each eager op is a pass over memory, so the work is arranged around one
        # |X| temporary; edits touch only the k outlier columns (index_fill_ on [T, k]).
        # (torch.linalg.vector_norm(ord=inf) would skip the |X| copy but is ~10x slower.)
        # max|x| is exact in any dtype, so |X| and its maxima stay in X's dtype.
        shape = x.shape
        flat = x.reshape(-1, self.in_features)  # [T, in]
        ax = flat.abs()
        idx = self._outlier_columns(ax)
        has_outliers = idx.numel() > 0
        if has_outliers:
            if self.bnb_compat:  # only the outlier elements leave the row scale
                sub = ax[:, idx]  # [T, k]; elements >= threshold only occur in these columns
                ax.index_copy_(1, idx, sub.masked_fill_(sub >= self.threshold, 0))
            else:  # whole outlier columns (paper)
                ax.index_fill_(1, idx, 0)
        c_x = ax.amax(dim=1, keepdim=True).float()  # [T, 1]
        inv = INT8_ABSMAX_DIVISOR / torch.where(c_x == 0, torch.ones_like(c_x), c_x)
        # [T, in] fp32; a mixed 16-bit * fp32 mul is slower on CPU than cast + in-place mul
        xs = flat * inv if flat.dtype == torch.float32 else flat.float().mul_(inv)
        if has_outliers:
            xs.index_fill_(1, idx, 0)  # those columns go through the 16-bit path
        xq = xs.round_().to(torch.int8)
        acc = int8_matmul(xq, self.weight_int8.t())  # [T, out] int32, exact
        # cast, then in-place: a mixed int32 * fp32 mul takes a slow promotion path on CPU
        y = acc.float().mul_(self.weight_absmax * INV_DIVISOR_SQ).mul_(c_x)
        if self.bias is not None:
            y.add_(self.bias.float())
        if has_outliers:
            if self.outliers == "static":
                w_out = self.outlier_weight.float()
            else:
                w_out = self._dequantized_columns(idx)
            y.addmm_(flat[:, idx].float(), w_out.t())  # [T, k] · [k, out]
        if self.track_stats:
            self._update_stats(idx.numel())
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _update_stats(self, n_outliers: int) -> None:
        self.stats["forwards"] += 1
        self.stats["outlier_cols_sum"] += n_outliers
        self.stats["outlier_cols_max"] = max(self.stats["outlier_cols_max"], n_outliers)

    def int8_share(self) -> float:
        """Share of multiply-adds done in 8 bits over the tracked forwards (1.0 if none)."""
        if self.outliers == "static":
            return 1.0 - self.outlier_idx.numel() / self.in_features
        if self.stats["forwards"] == 0:
            return 1.0
        mean_cols = self.stats["outlier_cols_sum"] / self.stats["forwards"]
        return 1.0 - mean_cols / self.in_features

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the int8 path and the static columns represent, [out, in]."""
        w = self.weight_int8.float() * (self.weight_absmax / INT8_ABSMAX_DIVISOR)[:, None]
        if self.outlier_idx.numel():
            w[:, self.outlier_idx] = self.outlier_weight.float()
        return w.to(dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, threshold={self.threshold}, "
            f"outliers={self.outliers}, static_cols={self.outlier_idx.numel()}, bnb_compat={self.bnb_compat}"
        )
