"""How a linear layer's product is computed: per weight format, device and row count, the form that measured fastest.

One product, y = x · Wᵀ, has several forms, and which is fastest depends on how many rows x has:
- **float weights** (bf16, fp32): oneDNN's matmul (what `F.linear` calls on CPUs) is the fast GEMM for many rows,
  but for a single row, a decoding step at batch 1, ATen's own matrix-vector kernel reads the weight at 90–107 % of
  the copy bandwidth where oneDNN's reaches 38–57 % (bf16 on the AMD Zen 4 here). `Linear` runs one row through it.
- **int8 and int4 weights**: torch's weight-only kernels dequantize inside their loops, once per few rows, so they
  win for a few rows and lose for many (int8's takes 3.3× a bf16 GEMM's time at 758 rows, int4's 2.5×). For many
  rows `dequantized_product` makes the float weight one tile of rows at a time, in a buffer kept between calls, and
  multiplies by each tile with the float GEMM: the 30 s prompt's prefill then runs at 0.89× bf16's speed in int8
  (its kernel: 0.30×) and 0.83× in int4 (0.45×), on the 2-core bench (BENCHMARKS.md).

`FORMS` holds the crossovers, measured by `benchmarks/linear_forms.py` per machine (a CPU's instruction sets, or a
GPU): the rows up to which each kernel is used. BENCHMARKS.md, "Which form computes a product", has the tables.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Rows up to which each form is chosen, per machine (`machine()`); the float GEMM computes everything else.
# "bf16 gemv": a bf16 product through ATen's matrix-vector kernel (fp32 and fp16 products take the same kernel with
# oneDNN or without); "int8", "int8 fp32": int8's kernel with bf16 (fp16) or fp32 activations; "int4": int4's
# kernel. Measured with benchmarks/linear_forms.py on an 11008 × 4096 layer.
FORMS: dict[str, dict[str, int]] = {
    "avx512+bf16": {"bf16 gemv": 1, "int8": 12, "int8 fp32": 2, "int4": 64},  # AMD Zen 4, 2 cores (2026-12-07)
    "cuda": {"bf16 gemv": 0, "int8": 0, "int8 fp32": 0, "int4": 16},  # int4's crossover unmeasured: gpu_check.sh
}
DEFAULT_FORMS = FORMS["avx512+bf16"]  # a machine not measured yet
TILE_ELEMENTS = 1 << 23  # weights dequantized at a time on a CPU: 16 MB of bf16, half the L3 cache here (758 rows
# through 11008 × 4096: 4 % faster than tiles of 8 MB, as fast as 32 MB)
TILE_ELEMENTS_CUDA = 1 << 24  # 16 M weights: 64 MB in fp32 while a tile is made


def cpu_machine() -> str:
    """This CPU's row of FORMS: torch's vector capability, then "+bf16" where it has AVX512_BF16 and "+amx" where it
    has AMX tiles (the instruction sets that change which kernel wins)."""
    parts = [torch.backends.cpu.get_cpu_capability().lower()]
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        parts.append("bf16")
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        parts.append("amx")
    return "+".join(parts)


CPU_MACHINE = cpu_machine()  # read once, here: torch.compile cannot trace the query


def machine(device: torch.device) -> str:
    """The row of FORMS recorded for `device`."""
    return CPU_MACHINE if device.type == "cpu" else device.type


def max_rows(form: str, device: torch.device) -> int:
    """Rows up to which `form` computes products on `device` (FORMS; DEFAULT_FORMS for an unmeasured CPU, 0 for an
    unmeasured accelerator)."""
    forms = FORMS.get(machine(device), DEFAULT_FORMS if device.type == "cpu" else {})
    return forms.get(form, 0)


def takes_gemv(rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a product of `rows` rows goes through ATen's matrix-vector kernel (FORMS' "bf16 gemv")."""
    return dtype == torch.bfloat16 and device.type == "cpu" and rows <= max_rows("bf16 gemv", device)


_onednn = {"inside": 0, "before": True}  # blocks inside `without_onednn`, in every thread, and the flag they found
_onednn_lock = threading.Lock()


@contextlib.contextmanager
def without_onednn() -> Iterator[None]:
    """oneDNN off for the block, which is how torch reaches ATen's own matrix-vector kernel: it offers no other way.
    The switch is process-wide, so it is counted: the first block in turns oneDNN off, the last one out restores
    what the first found (two threads saving and restoring it each for itself could leave it off for good).
    Meanwhile another thread's bf16 GEMM takes ATen's slower kernel, with the same result to rounding.
    (torch.backends.mkldnn.flags would also warn about TF32 on Intel GPUs.)"""
    with _onednn_lock:
        if _onednn["inside"] == 0:
            _onednn["before"] = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _onednn["inside"] += 1
    try:
        yield
    finally:
        with _onednn_lock:
            _onednn["inside"] -= 1
            if _onednn["inside"] == 0:
                torch._C._set_mkldnn_enabled(_onednn["before"])


def float_product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, with a single bf16 row on a CPU sent to ATen's matrix-vector kernel instead of oneDNN's. Not inside
    torch.compile, whose graph chooses its own kernels (`compile_decoding` turns oneDNN off around a one-row step)."""
    if torch.compiler.is_compiling() or not takes_gemv(x.numel() // x.shape[-1], x.dtype, x.device):
        return F.linear(x, weight, bias)
    with without_onednn():
        return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (the same parameters and checkpoint names) computing through `float_product`."""

    def forward(self, x: Tensor) -> Tensor:
        return float_product(x, self.weight, self.bias)


_scratch = threading.local()


def scratch(name: str, elements: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of at least `elements`, kept per thread between calls (and for the thread's life: about 40 MB
    for bf16 int4 tiles on a CPU). Tiles are written into kept memory because a fresh 8 MB allocation is returned to
    the system when freed and faults its pages in again on the next call: converting int8 to bf16 into a new tensor
    runs at 1.9 G weights/s on the CPU here, into a kept one at 16."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < elements:
        buffers[key] = buffer = torch.empty(elements, dtype=dtype, device=device)
    return buffer[:elements]


def tile_rows(in_features: int, device: torch.device, multiple: int = 1) -> int:
    """Output rows dequantized at a time: about TILE_ELEMENTS weights, a multiple of `multiple`. Each tile repacks
    the GEMM's other operand, x, so fewer, larger tiles win until the tile leaves the cache."""
    elements = TILE_ELEMENTS_CUDA if device.type == "cuda" else TILE_ELEMENTS
    return max(multiple, elements // in_features // multiple * multiple)


def dequantized_product(x: Tensor, out_features: int, rows_per_tile: int,
                        dequantize: Callable[[int, int], Tensor]) -> Tensor:
    """x [M, in] · Wᵀ for a quantized W made float one tile of output rows at a time: `dequantize(start, stop)`
    returns rows start:stop of W, transposed ([in, stop − start], x's dtype; a view of a `scratch` buffer), and the
    float GEMM writes that tile's columns of y. Only one tile of float weights exists at any time."""
    y = x.new_empty(x.shape[0], out_features)
    for start in range(0, out_features, rows_per_tile):
        stop = min(start + rows_per_tile, out_features)
        torch.mm(x, dequantize(start, stop), out=y[:, start:stop])
    return y
