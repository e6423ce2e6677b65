"""QLinear: a Linear whose weight is a QTensor.

mode "fake": the dequantized weight is cached densely (accuracy studies, fast forward).
mode "real": only codes and scales are held; forward runs the kernel chosen for the format,
device and input dtype (quantkit.nn.kernels: int8 W8A8 with exact int32 accumulation, torch's
int8/int4 weight-only kernels, FP4 dequantized tile by tile). ``kernel`` says which and why.
The QTensor is kept in both modes so export writes the exact codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import get_format
from quantkit.formats.base import QTensor
from quantkit.nn.kernels import cuda as k_cuda
from quantkit.nn.kernels import fp4_int4 as k_fp4_int4
from quantkit.nn.kernels import int4 as k_int4
from quantkit.nn.kernels import int4_tiled
from quantkit.nn.kernels import int8 as k_int8
from quantkit.nn.kernels import tiled
from quantkit.nn.kernels.select import Choice, Device, choose

# quantization parameters keep their stored dtype through model.to(dtype)/.half()/.float():
# rounding an fp32 global scale or an E4M3 block scale to bf16 would change what the codes mean
PROTECTED_BUFFERS = ("weight_scale", "weight_global_scale", "input_global_scale", "output_scale")


def rotate_input(x: torch.Tensor, block: int) -> torch.Tensor:
    """The online input transform x -> x R, R = block-diagonal H_block / sqrt(block) (docs/rotation.md).

    Computed as compressed-tensors' ``hadamard`` transform computes an online ``input`` rotation with
    head_dim=block and precision float32: a +-1 Sylvester matrix, then a division by sqrt(block), so
    quantkit's runtime and compressed-tensors' hooks give the same bits.
    """
    h = sylvester(block, x.device)
    n = x.shape[-1]
    y = (x.to(torch.float32).unflatten(-1, (n // block, block)) @ h).flatten(-2)  # [..., in/b, b] -> [..., in]
    return (y / math.sqrt(block)).to(x.dtype)  # a Python scalar: divided in fp32, as a 0-dim tensor would be


SYLVESTER_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def sylvester(block: int, device: torch.device) -> torch.Tensor:
    """The +-1 Sylvester Hadamard matrix [block, block] (compressed-tensors' deterministic_hadamard_matrix)."""
    key = (block, str(device))
    if key not in SYLVESTER_CACHE:
        h = torch.ones(1, 1)
        while h.shape[0] < block:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # [2k, 2k] from [k, k]
        SYLVESTER_CACHE[key] = h.to(device)
    return SYLVESTER_CACHE[key]


class QLinear(nn.Module):
    def __init__(
        self,
        qweight: QTensor,
        bias: torch.Tensor | None,
        *,
        mode: str = "real",
        act_format: str | None = None,
        input_global_scale: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.weight_format = qweight.format
        self.mode = mode
        self.act_format = act_format
        self.compute_dtype = compute_dtype
        self.qmeta = dict(qweight.meta)
        self.register_buffer("weight_codes", qweight.codes)
        self.register_buffer("weight_scale", qweight.scale)
        self.register_buffer("weight_global_scale", qweight.global_scale)
        self.register_buffer("input_global_scale", input_global_scale)
        # optional exact per-output-row multiplier (folded corrections such as ATM/OHB)
        self.register_buffer("output_scale", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._dense: torch.Tensor | None = None
        self._choices: dict[tuple[torch.device, torch.dtype], Choice] = {}
        self._kcache: dict[str, torch.Tensor] = {}  # kernel-specific derived tensors, not in state_dict
        # "int4_cpu": weight_codes were converted in place to torch's CPU int4 layout on the first
        # int4pack_mm forward (one resident copy); "fp4_int4x2": FP4 codes converted in place to the
        # split INT4 layout (fp4_int4.py, twice the bytes). qweight and state_dict give the
        # canonical codes back
        self._codes_layout = "canonical"
        # online Hadamard block size (the `rotate` pass): the weight was rotated offline, so every
        # input must be rotated too; written as a compressed-tensors transform_config
        self.input_rotation: int | None = None
        self.input_rotation_group = "v"  # the compressed-tensors transform scheme it is written under
        if mode == "fake":
            self._dense = self.dequantized_weight(compute_dtype)

    @property
    def qweight(self) -> QTensor:
        codes = self.weight_codes
        if self._codes_layout == "int4_cpu":
            codes = k_int4.unpack_from_cpu(codes, self.out_features, self.in_features)
        elif self._codes_layout == "fp4_int4x2":
            block = get_format(self.weight_format).block
            codes = k_fp4_int4.unpack(codes, self.out_features, self.in_features, block)
        return QTensor(
            self.weight_format,
            codes,
            self.weight_scale.contiguous(),  # a view into torch's INT4 table after an int4pack_mm forward
            (self.out_features, self.in_features),
            self.weight_global_scale,
            dict(self.qmeta),
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = get_format(self.weight_format).dequantize(self.qweight, dtype)
        if self.output_scale is not None:
            w = w * self.output_scale.to(dtype)[:, None]
        return w

    def set_output_scale(self, scale: torch.Tensor) -> None:
        """Multiply output rows by scale [out] exactly, without touching the codes."""
        prev = self.output_scale if self.output_scale is not None else torch.ones_like(scale, dtype=torch.float32)
        self.output_scale = (prev * scale.float()).to(self.weight_codes.device)
        self._kcache.clear()
        if self.mode == "fake":
            self._dense = self.dequantized_weight(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # .to()/.float()/.cuda(): quantization parameters move device but keep their dtype, and
        # the dense cache is rebuilt from the codes in the new dtype rather than cast, so a bf16
        # cache never leaks bf16 rounding into an fp32 model
        kept = {n: self._buffers[n] for n in PROTECTED_BUFFERS if self._buffers.get(n) is not None}
        probe = fn(torch.zeros(1, dtype=self.compute_dtype, device=self.weight_codes.device))
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        self._choices.clear()
        self._kcache.clear()
        scale = self._buffers.get("weight_scale")
        if scale is not None and not scale.is_contiguous():  # a view of the dropped INT4 table
            self._buffers["weight_scale"] = scale.contiguous()
        if self._dense is not None:
            self._dense = self.dequantized_weight(self.compute_dtype).to(probe.device)
        return self

    # -- kernel selection -------------------------------------------------------------------------
    @property
    def kernel(self) -> Choice:
        """The kernel a forward in compute_dtype runs, with the reason (reports, `inspect`)."""
        return self.kernel_for(self.compute_dtype)

    def kernel_for(self, dtype: torch.dtype) -> Choice:
        device = self.weight_codes.device
        key = (device, dtype)
        if key not in self._choices:
            self._choices[key] = choose(self.weight_format, self.act_format, self.mode,
                                        (self.out_features, self.in_features), Device.of(device), dtype,
                                        self.qmeta.get("group"))  # FP4_DECODE_ENV read by choose
        return self._choices[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation:
            x = rotate_input(x, self.input_rotation)
        if self._dense is not None:  # fake mode
            if self.act_format is not None:
                x = get_format(self.act_format).fake_activation(x, self.input_global_scale)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self._dense.to(x.dtype), bias)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, in]
        y = self._run(self.kernel_for(x.dtype).for_rows(flat.shape[0]), flat)
        return y.reshape(*shape[:-1], self.out_features)

    def _run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out] with the named kernel."""
        if kernel in ("int8_exact_f32", "int_mm"):
            rows = tiled.tile_rows(self.out_features, self.in_features, torch.float32)
            if "w8a8_ws" not in self._kcache:
                self._kcache["w8a8_ws"] = k_int8.w8a8_scales(self.weight_scale, self.output_scale)
                self._kcache["w8a8_one_pass"] = torch.tensor(k_int8.exact_in_one_pass(self.weight_codes))
            return k_int8.w8a8_linear(x, self, kernel, rows, self._kcache["w8a8_ws"],
                                      bool(self._kcache["w8a8_one_pass"]))
        if kernel == "int8pack_mm":
            if "scales_bf16" not in self._kcache:
                self._kcache["scales_bf16"] = self.weight_scale.reshape(-1).to(torch.bfloat16).contiguous()
            return k_int8.w8a16_linear(x, self, self._kcache["scales_bf16"])
        if kernel == "int4pack_mm":
            group = self.qmeta.get("group") or self.in_features
            key = f"int4pack_{x.dtype}"
            if self._codes_layout != "int4_cpu":  # converted once, in place: the canonical copy is not kept
                self._buffers["weight_codes"] = k_int4.pack_for_cpu(self.weight_codes)
                self._codes_layout = "int4_cpu"
            if key not in self._kcache:
                self._kcache[key] = self._int4_table(x.dtype)
            return k_int4.int4_linear(x, self.weight_codes, group, self._kcache[key], self)
        if kernel == "fp4_int4x2":
            fmt = get_format(self.weight_format)
            if self._codes_layout != "fp4_int4x2":  # converted once, in place (2x the packed bytes)
                self._buffers["weight_codes"] = k_fp4_int4.pack(self.weight_codes, fmt.block)
                self._codes_layout = "fp4_int4x2"
            key = f"fp4x2_{x.dtype}"
            if key not in self._kcache:
                d = fmt.divisor(self.weight_scale, self.weight_global_scale)  # [out, nb] fp32
                self._kcache[key] = k_fp4_int4.scales_and_zeros(d, x.dtype)
            return k_fp4_int4.fp4_int4x2_linear(x, self.weight_codes, fmt.block, self._kcache[key], self)
        if kernel.startswith("scaled_mm_"):
            return k_cuda.fp4_scaled_mm(x, self, get_format(self.weight_format))
        if kernel == "tiled_f32" and self._codes_layout != "canonical":
            return self._tiled_from_int4_layout(x)
        if self.act_format is not None:  # fake_act_tiled
            x = get_format(self.act_format).fake_activation(x, self.input_global_scale)
        return tiled.tiled_linear(x, self.qweight, self.bias, self.output_scale, fp32=kernel == "tiled_f32")

    def _tiled_from_int4_layout(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 prefill decoding tiles straight from the converted INT4 / FP4 int4x2 codes."""
        shape = (self.out_features, self.in_features)
        if self._codes_layout == "int4_cpu":
            group = self.qmeta.get("group") or self.in_features
            scale = self.weight_scale.reshape(self.out_features, -1).float()  # [out, in/group]
            return int4_tiled.int4_layout_linear(x, self.weight_codes, shape, group, scale, False, self.bias,
                                                 self.output_scale)
        fmt = get_format(self.weight_format)
        half_d = fmt.divisor(self.weight_scale, self.weight_global_scale) * 0.5  # [out, nb] fp32, exact halving
        return int4_tiled.int4_layout_linear(x, self.weight_codes, shape, fmt.block, half_d, True, self.bias,
                                             self.output_scale)

    def _int4_table(self, dtype: torch.dtype) -> torch.Tensor:
        """torch's [groups, out, 2] scale-and-zero table; the scales are held once where possible.

        When the stored scales already have the input dtype, weight_scale becomes a view of the
        table's scale column (same bits), so the scales are not kept twice; only the kernel's zero
        column is extra. Building the table per call instead cost 27-43% of a decode GEMV.
        """
        table = k_int4.scales_and_zeros(self.weight_scale, dtype)
        if self.weight_scale.dtype == dtype:
            self._buffers["weight_scale"] = table[..., 0].t().view(self.weight_scale.shape)
        return table

    # state_dict and load_state_dict always speak canonical codes, whatever layout is resident
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._codes_layout != "canonical" and prefix + "weight_codes" in destination:
            destination[prefix + "weight_codes"] = self.qweight.codes
        if prefix + "weight_scale" in destination and destination[prefix + "weight_scale"] is not None:
            destination[prefix + "weight_scale"] = destination[prefix + "weight_scale"].contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight_codes" in state_dict and self._codes_layout != "canonical":
            # the converted layout may have another shape (fp4_int4x2: twice the bytes)
            self._buffers["weight_codes"] = self.qweight.codes
            self._codes_layout = "canonical"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._kcache.clear()  # tables derived from the old scales

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, weight={self.weight_format}, "
            f"act={self.act_format}, mode={self.mode}, kernel={self.kernel.name}"
            + (f", input_rotation={self.input_rotation}" if self.input_rotation else "")
        )


def quantize_linear(
    linear: nn.Linear,
    weight_format: str,
    *,
    mode: str = "real",
    act_format: str | None = None,
    global_scale: torch.Tensor | None = None,
    input_global_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> QLinear:
    """Build a QLinear from an nn.Linear (the Linear itself is not modified)."""
    from quantkit.targets import Conv1D, linear_weight

    fmt = get_format(weight_format)
    qw = fmt.quantize(linear_weight(linear).detach().contiguous(), global_scale=global_scale)
    if Conv1D and isinstance(linear, Conv1D):
        qw.meta["conv1d"] = True  # GPT-2 layout: the checkpoint writer must know
    q = QLinear(
        qw,
        linear.bias,
        mode=mode,
        act_format=act_format,
        input_global_scale=input_global_scale,
        compute_dtype=compute_dtype or linear.weight.dtype,
    )
    return inherit_rotation(q, linear)


def inherit_rotation(q: QLinear, linear: nn.Module) -> QLinear:
    """The rotate pass's online input rotation (block and transform scheme name) carried onto the QLinear built
    from `linear`."""
    q.input_rotation = getattr(linear, "input_rotation", None)
    q.input_rotation_group = getattr(linear, "input_rotation_group", q.input_rotation_group)
    return q
