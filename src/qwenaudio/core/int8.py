"""Int8 weight-only linear layers: how a quantized decoder computes, and how weights are quantized as they load.

Each output channel (a row of the weight) gets its own scale, max |w| / 127; activations stay in the model's float
dtype, and since the scale is per output, y = (x · int8ᵀ) · scale. Int8 weights take half of bf16's memory, which
is what lets the whole model run at a 10.7 GiB peak instead of 15.5 (BENCHMARKS.md), and a one-token decoding step
reads half the bytes.

How a product is computed (`Int8Linear.form`) follows measurements (core/linear.py, FORMS): for a few rows on a
CPU, torch's kernel, `torch._weight_int8pack_mm`, which reads the int8 weight once per four rows (on the AMD CPU
here, one 11008 × 4096 layer: 2.0 ms for one row against a bf16 matmul's 4.9, but 540 ms for 758 rows against
165); for more, the weight is converted to the activations' dtype one tile of rows at a time and multiplied by the
float GEMM (`dequantized_product`: 758 rows in 1.08× bf16's time), scaled per output after. Under
torch.compile, a single row is written as products and a sum, which the compiler fuses into one pass over the int8
weight (3.4 ms with fp32 activations, where the kernel takes 20); CUDA has no int8 kernel, so there this form is
what a compiled decoding step takes (converting instead ran at 94 tok/s on an H200, slower than bf16's 202).

A quantized checkpoint stores each quantized `*.weight` as int8 next to its `*.weight_scale`, with
`"quantization": "int8-weight-only"` in config.json; `load` reads it as it is (`qwenaudio.quantize` writes one).
The embedding table stays in float: a lookup reads one row per token, not the whole table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import QUANTIZATION_METHODS
from .linear import dequantized_product, max_rows, scratch, tile_rows

METHOD = QUANTIZATION_METHODS["int8"]  # "int8-weight-only", the value of config.json's "quantization"
CHUNK_ROWS = 4096  # rows quantized at a time, so lm_head (155,947 rows) needs no full fp32 copy


def scale_name(weight_name: str) -> str:
    """`lm_head.weight` -> `lm_head.weight_scale`: where a quantized weight's per-row scales are stored."""
    return weight_name + "_scale"


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], fp32 scales [out]) with weight ≈ int8 · scale."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        w = weight[start : start + CHUNK_ROWS].detach().float()
        s = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q[start : start + CHUNK_ROWS] = torch.round(w / s[:, None]).clamp(-127, 127)
        scales[start : start + CHUNK_ROWS] = s
    return q, scales


class Int8Linear(nn.Module):
    """A drop-in for `nn.Linear` holding int8 `weight` and per-row `weight_scale` (in the activations' dtype)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=False, dtype=linear.weight.dtype)
        layer.weight, scales = quantize_weight(linear.weight)
        layer.weight_scale = scales.to(linear.weight.dtype)
        layer.bias = linear.bias
        return layer

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.weight.data_ptr() % 64:  # a view into a memory-mapped shard need not be aligned; the kernel's
            self.weight = self.weight.clone()  # AVX-512 loads require it (an unaligned weight crashed the process)

    @staticmethod
    def form(x: Tensor, rows: int) -> str:
        """How `rows` rows of `x` are multiplied (the module docstring; core/linear.py's FORMS): "kernel" (torch's, on
        CPUs, for few rows; it has no backward, so not when x needs a gradient, as under LoRA), "sum" (products and
        a sum: one row under torch.compile, unless the kernel is faster there), "dequantize" (tile by tile into a
        float GEMM) or "convert" (the whole weight in x's dtype: the form autograd and torch.compile can follow)."""
        compiling = torch.compiler.is_compiling()
        grad = x.requires_grad and torch.is_grad_enabled()
        kernel_rows = max_rows("int8 fp32" if x.dtype == torch.float32 else "int8", x.device)
        if x.device.type == "cpu" and not grad and rows <= kernel_rows and \
                not (compiling and rows == 1 and x.dtype == torch.float32):
            return "kernel"
        if compiling and rows == 1:
            return "sum"
        return "convert" if grad or compiling else "dequantize"

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        y = self.product(rows, self.form(x, rows.shape[0])).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def product(self, rows: Tensor, form: str) -> Tensor:
        """rows [M, in] · Wᵀ in the named form (`form`'s), without the bias."""
        scale = self.weight_scale.to(rows.dtype)
        if form == "kernel":
            return torch._weight_int8pack_mm(rows, self.weight, scale)
        if form == "sum":
            return ((rows.float() * self.weight).sum(-1) * self.weight_scale.float()).to(rows.dtype)[None]
        if form == "convert":
            return (rows @ self.weight.to(rows.dtype).T) * scale
        tile = tile_rows(self.in_features, rows.device)
        weights = scratch("int8 tile", tile * self.in_features, rows.dtype, rows.device)

        def dequantize(start: int, stop: int) -> Tensor:
            part = weights[: (stop - start) * self.in_features].view(stop - start, self.in_features)
            return part.copy_(self.weight[start:stop]).T

        return dequantized_product(rows, self.out_features, tile, dequantize).mul_(scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` inside `module` (in place) by an `Int8Linear`; returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child)
    return module


def quantizer(names: list[str], dtype: torch.dtype | None) -> Callable[[str, Tensor], dict[str, Tensor]]:
    """A per-tensor hook for `load_checkpoint`: the named weights arrive as int8 plus scales (in `dtype`), the
    rest unchanged. Quantizing each tensor as it is read keeps the peak at the int8 size, not the bf16 one."""
    wanted = set(names)

    def convert(name: str, tensor: Tensor) -> dict[str, Tensor]:
        if name not in wanted:  # copied out of the shard's memory map, so that the map closes once the shard is
            return {name: tensor.clone()}  # read: each kept view would pin a whole shard's pages (21 GB peak)
        weight, scales = quantize_weight(tensor)
        return {name: weight, scale_name(name): scales.to(dtype or tensor.dtype)}

    return convert
