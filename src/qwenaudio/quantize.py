"""Int8 weight-only quantization of the decoder's linear layers.

Each output channel (a row of the weight) gets its own scale, max |w| / 127; activations stay in the model's float
dtype, and since the scale is per output, y = (x · int8ᵀ) · scale. Int8 weights take a quarter of fp32's memory,
which is what lets the 7.7 B-parameter decoder fit a 24 GB machine. Speed depends on the kernels: on the 2-core
AVX2 CPU here (torch 2.13), for a 4096 × 11008 layer, `torch._weight_int8pack_mm` takes 26 ms for one row (fp32:
10.5 ms) but 20 s for 758 rows, while converting the weight to fp32 and multiplying takes 65 ms and 0.47 s (fp32:
0.49 s). So a few rows (decoding) use the int8 kernel and longer inputs (prefill) convert first. The embedding
table stays in float: a lookup reads one row per token, not the whole table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

KERNEL_MAX_ROWS = 4  # up to here the int8 kernel wins (measured above); beyond it, converting the weight does


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], fp32 scales [out]) with weight ≈ int8 · scale."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A drop-in for `nn.Linear` holding int8 weights and per-row scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scales = quantize_weight(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        scales = self.scales.to(x.dtype)
        if rows.shape[0] <= KERNEL_MAX_ROWS:
            y = torch._weight_int8pack_mm(rows, self.weight, scales)
        else:
            y = (rows @ self.weight.to(x.dtype).T) * scales
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` inside `module` (in place) by an `Int8Linear`; returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return module
