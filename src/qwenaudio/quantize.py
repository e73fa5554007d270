"""Int8 weight-only quantization of the decoder's linear layers.

Decoding reads every weight once per token, so its speed is memory bandwidth: fp32 weights are 4 bytes each, int8
are 1. Each output channel (a row of the weight) gets its own scale, max |w| / 127, and the matrix product runs
on the int8 weights directly through `torch._weight_int8pack_mm`, which multiplies by the scales at the end;
activations stay in the model's float dtype. The embedding table is left alone: a lookup reads one row per
token, not the whole table.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales.to(x.dtype))
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
