"""Int4 weight-only linear layers: about a quarter of bf16's bytes, for running on small machines.

Each row of a weight is cut into groups of `group_size` inputs; a group gets a scale and a zero, and its weights
become q ∈ 0..15 with w ≈ (q − 8) · scale + zero, the layout torch's int4 kernels read
(`_weight_int4pack_mm_for_cpu` on CPUs, tinygemm's `_weight_int4pack_mm` on CUDA). Activations stay in the model's
float dtype; the kernels have no backward, so int4 is for inference (LoRA trains over int8).

Rounding to nearest between a group's min and max spends levels on its extremes. `quantize_weight` then refines
each group data-free: a few rounds of fitting scale and zero to the current levels by least squares and rounding
again to the nearest level. Neither half raises the squared error (but for a clamp keeping scales positive), so it
falls round by round; BENCHMARKS.md tables the reconstruction error per group size with and without it.

A quantized checkpoint stores each quantized `*.weight` as uint8 [out, in / 2] (two levels a byte, the even input
in the low nibble) next to its `*.weight_scale` and `*.weight_zero` [out, in / group_size], with
`"quantization": "int4-weight-only"` and `"quantization_group_size"` in config.json; `qwenaudio quantize --bits 4`
writes one. The kernel's own packed layout differs per device, so it is made when the layer loads.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .config import INT4_GROUP_SIZES, QUANTIZATION_METHODS
from .errors import InputError
from .linear import dequantized_product, max_rows, scratch, tile_rows

METHOD = QUANTIZATION_METHODS["int4"]  # "int4-weight-only", the value of config.json's "quantization"
GROUP_SIZES = INT4_GROUP_SIZES  # config.json's "quantization_group_size"
DEFAULT_GROUP_SIZE = 64  # BENCHMARKS.md, "int4": the error of 32 at the speed of 128
REFINE_ROUNDS = 2  # least-squares rounds after rounding to nearest: two thirds of what eight gain, a quarter the time
CHUNK_ROWS = 1024  # rows quantized (and packed) at a time: lm_head has 155,947, and each is 4096 fp32 to refine


def zero_name(weight_name: str) -> str:
    """`lm_head.weight` -> `lm_head.weight_zero`: where a quantized weight's per-group zeros are stored."""
    return weight_name + "_zero"


def fitting_group_size(widths: dict[str, int], requested: int | None = None) -> int:
    """The group size for layers of `widths` inputs (by name): `requested` if it divides every layer's inputs, else
    an InputError naming the first layer it does not; by default DEFAULT_GROUP_SIZE, or where that does not divide
    a layer's inputs the largest allowed size below it that divides all (a warning says so), since the kernels
    need whole groups. A model no allowed size fits is refused: int8 takes any width."""
    def misfit(size: int) -> tuple[str, int] | None:
        return next(((name, width) for name, width in widths.items() if width % size), None)

    if requested is not None and (isinstance(requested, bool) or requested not in GROUP_SIZES):
        raise InputError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {requested!r}")
    wanted = DEFAULT_GROUP_SIZE if requested is None else requested
    bad = misfit(wanted)
    if bad is None:
        return wanted
    fits = [size for size in sorted(GROUP_SIZES, reverse=True) if misfit(size) is None]
    if not fits:
        raise InputError(f"no int4 group size ({', '.join(map(str, GROUP_SIZES))}) divides the {bad[1]} inputs of "
                         f"{bad[0]}: this model cannot be quantized to int4; use int8 (--int8, quantize --bits 8)")
    smaller = [size for size in fits if size < wanted]
    if requested is not None or not smaller:
        raise InputError(f"group size {wanted} does not divide the {bad[1]} inputs of {bad[0]}: --group-size "
                         f"{fits[0]} fits every layer")
    warnings.warn(f"int4: groups of {smaller[0]}, since {wanted} does not divide the {bad[1]} inputs of {bad[0]}",
                  stacklevel=2)
    return smaller[0]


def quantize_weight(weight: Tensor, group_size: int = DEFAULT_GROUP_SIZE, refine: bool = True
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric int4: (levels uint8 [out, in] in 0..15, scales and zeros fp32 [out, in / group_size])
    with weight ≈ (levels − 8) · scale + zero, refined (see the module docstring) unless `refine` is off."""
    out, inputs = weight.shape
    if group_size not in GROUP_SIZES or inputs % group_size:
        raise InputError(f"group size {group_size} must be one of {GROUP_SIZES} and divide the {inputs} inputs")
    levels = torch.empty(out, inputs, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out, inputs // group_size, dtype=torch.float32, device=weight.device)
    zeros = torch.empty_like(scales)
    for start in range(0, out, CHUNK_ROWS):
        w = weight[start : start + CHUNK_ROWS].detach().float().reshape(-1, inputs // group_size, group_size)
        low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-8)
        zero = low + 8 * scale
        q = _round(w, scale, zero)
        for _ in range(REFINE_ROUNDS if refine else 0):
            scale, zero = _fit(w, q - 8, scale, zero)
            q = _round(w, scale, zero)
        rows = w.shape[0]
        levels[start : start + rows] = q.reshape(rows, inputs).to(torch.uint8)
        scales[start : start + rows], zeros[start : start + rows] = scale.squeeze(-1), zero.squeeze(-1)
    return levels, scales, zeros


def _round(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The nearest level of each weight: the best q for a given scale and zero, weight by weight."""
    return torch.round((w - zero) / scale + 8).clamp(0, 15)


def _fit(w: Tensor, centred: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """The least-squares scale and zero of each group for fixed levels (w ≈ centred · scale + zero); a group whose
    levels are all equal keeps its scale."""
    n = w.shape[-1]
    mean_q, mean_w = centred.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
    spread = (centred * centred).mean(-1, keepdim=True) - mean_q * mean_q
    fitted = ((centred * w).mean(-1, keepdim=True) - mean_q * mean_w) / spread.clamp(min=1e-12)
    scale = torch.where(spread * n > 1e-6, fitted.clamp(min=1e-8), scale)
    return scale, mean_w - scale * mean_q


def dequantize(levels: Tensor, scales: Tensor, zeros: Tensor, dtype: torch.dtype) -> Tensor:
    """The float weight [out, in] that levels, scales and zeros stand for."""
    group_size = levels.shape[1] // scales.shape[1]
    centred = levels.to(dtype).reshape(levels.shape[0], -1, group_size) - 8
    return (centred * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).reshape(levels.shape)


def pack(levels: Tensor) -> Tensor:
    """Levels [out, in] (0..15) as stored: uint8 [out, in / 2], the even input in the low nibble."""
    return levels[:, ::2] | (levels[:, 1::2] << 4)


def unpack(packed: Tensor) -> Tensor:
    """The inverse of `pack`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def unpack_tinygemm(packed: Tensor) -> Tensor:
    """Levels uint8 [8 · tiles, in] from tinygemm's CUDA layout, int32 [tiles, in / (16 · k_tiles), 32, k_tiles / 2]
    (torch's `_convert_weight_to_int4pack`, aten/src/ATen/native/cuda/int4mm.cu; its layout since torch 2.5).
    Each tile holds 8 output rows; lane t of a tile serves row t // 4, and the int32 at [tile, o, t, j] holds 8
    levels of two 16-input k-tiles starting at input 32 · (o · k_tiles / 2 + j): nibble 4h + s (h the high half)
    is input 8s + 2 · (t % 4) + h from there. Only tiles of whole rows are ever unpacked, so a slice of tiles works."""
    tiles, outer, lanes, half = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = ((packed[..., None] >> shifts) & 15).to(torch.uint8)  # [tiles, outer, lanes, half, 8]
    # lanes = (row 8, column 4), nibbles = (h 2, s 4)  ->  [tile, row | outer, half, s, column, h]
    nibbles = nibbles.view(tiles, outer, 8, 4, half, 2, 4).permute(0, 2, 1, 4, 6, 3, 5)
    return nibbles.reshape(tiles * 8, outer * half * 32)


@functools.cache
def reads_cpu_layout() -> bool:
    """Whether `Int4Linear._cpu_tile` reads the packing of the installed torch on this CPU. torch packs per vector
    capability (AVX-512: blocks of 64 rows, row j in a byte's low nibble and row 32 + j in its high one; AVX2 and
    others differ), so a known pattern is packed once and read back as `_cpu_tile` reads it."""
    levels = torch.randint(0, 16, (64, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(levels, 1).view(128, 32)
    return torch.equal(torch.cat([packed & 15, packed >> 4], dim=1).T.to(torch.int32), levels)


class Int4Linear(nn.Module):
    """A drop-in for `nn.Linear` (inference only) holding int4 `weight` with per-group `weight_scale` and
    `weight_zero`.

    It loads the stored layout (`pack`'s) and, at its first product, swaps it for the layout the device's kernel
    reads, keeping only that one, so the weight costs half a byte a parameter, not one and a half. The swap waits
    for the first product because while the model loads, the checkpoint's tensors are still held: converting then
    would hold both layouts of every layer at once. The kernel's layout belongs to the installed torch, so a layer
    that has computed cannot be saved: int4 checkpoints are written from float weights by
    `qwenaudio quantize --bits 4`.

    The kernel computes a few rows' products (decoding); for more (prefill), where it takes 2.5× a bf16 GEMM's time
    on the CPU here (13× on an H200), the weight is dequantized from the kernel's layout one tile of rows at a time
    into the float GEMM (`form`; core/linear.py's FORMS hold the crossovers)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=dtype))
        self.register_buffer("weight_zero", torch.empty(out_features, groups, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.packed_for: str | None = None  # the device whose kernel layout `weight` holds, from the first product
        self._scales_and_zeros: Tensor | None = None  # made when the layer loads

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, refine: bool = True) -> Int4Linear:
        dtype = linear.weight.dtype
        layer = cls(linear.in_features, linear.out_features, dtype=dtype, group_size=group_size)
        layer.bias = linear.bias
        if linear.weight.is_meta:  # the layout only, to be filled by load_state_dict
            return layer
        levels, scales, zeros = quantize_weight(linear.weight, group_size, refine)
        layer.weight, layer.weight_scale, layer.weight_zero = pack(levels), scales.to(dtype), zeros.to(dtype)
        return layer

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if not self.weight.is_meta:  # the scales' and zeros' kernel layout now, while the model is being put
            self._scales_and_zeros = self._kernel_scales()  # together, rather than at the peak of the first run

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.packed_for:
            raise TypeError(f"{prefix or 'this layer'}: an int4 layer holds its weight as the installed torch's "
                            "kernel reads it, which is no checkpoint layout; write int4 checkpoints from float "
                            "weights with qwenaudio quantize --bits 4")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _to_kernel(self) -> None:
        """Replace the stored layout by the kernel's: the weight packed for this device (rows padded to a multiple
        of 64, which the kernels need; only lm_head, 155,947 rows, has to be padded) and the scales and zeros as
        [groups, out, 2]. On CPUs the packing is done in place, CHUNK_ROWS rows at a time (the kernel's layout keeps
        each 64 rows apart, and whole, lm_head's levels would take 2.5 GB as int32), so no second copy of the
        weight is ever made: the allocator would keep the freed one's memory."""
        device, rows = self.weight.device, self._padded_rows
        both = self._scales_and_zeros if self._scales_and_zeros is not None else self._kernel_scales()
        if rows != self.out_features:
            padding = self.weight.new_full((rows - self.out_features, self.weight.shape[1]), 0x88)  # levels 8: 0
            self.weight = torch.cat([self.weight, padding])
        if device.type == "cuda":  # tinygemm: the even input in the high nibble; 8 inner k-tiles where they fit
            tiles = next(t for t in (8, 4, 2, 1) if self.in_features % (16 * t) == 0)
            self.weight = torch._convert_weight_to_int4pack(((self.weight << 4) | (self.weight >> 4)), tiles)
        elif device.type == "cpu":
            for i in range(0, rows, CHUNK_ROWS):
                chunk = self.weight[i : i + CHUNK_ROWS]
                chunk.copy_(torch._convert_weight_to_int4pack_for_cpu(unpack(chunk).to(torch.int32), 1))
        else:
            raise ValueError(f"int4 weights run on CPUs and CUDA GPUs, not on {device.type}")
        self.weight_scale, self.weight_zero, self._scales_and_zeros = both, None, None
        self.packed_for = device.type

    @property
    def _padded_rows(self) -> int:
        """The output rows the kernels see: a multiple of 64."""
        return -(-self.out_features // 64) * 64

    def _kernel_scales(self) -> Tensor:
        """The scales and zeros as the kernels read them: [groups, rows padded to 64, 2] (bf16 on CUDA)."""
        both = torch.empty(self.weight_scale.shape[1], self._padded_rows, 2, device=self.weight_scale.device,
                           dtype=torch.bfloat16 if self.weight_scale.device.type == "cuda" else self.weight_scale.dtype)
        both[:, self.out_features :] = 0
        both[:, : self.out_features, 0] = self.weight_scale.T
        both[:, : self.out_features, 1] = self.weight_zero.T
        return both

    def form(self, x: Tensor, rows: int) -> str:
        """"kernel" (torch's weight-only kernel: few rows, always inside torch.compile, and on CPUs whose packing
        `_cpu_tile` does not read) or "dequantize" (tile by tile into the float GEMM: many rows; core/linear.py's
        FORMS)."""
        if rows <= max_rows("int4", x.device) or torch.compiler.is_compiling():
            return "kernel"
        return "dequantize" if x.device.type != "cpu" or reads_cpu_layout() else "kernel"

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("int4 layers have no backward: fine-tune over an int8 (or float) base instead")
        if self.packed_for is None:
            self._to_kernel()
        if x.device.type != self.packed_for:
            raise RuntimeError(f"int4 weights packed for {self.packed_for} cannot compute on {x.device.type}: load "
                               "the model onto the device it runs on instead of moving it")
        rows = x.reshape(-1, self.in_features)
        y = self.product(rows, self.form(x, rows.shape[0])).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def product(self, rows: Tensor, form: str) -> Tensor:
        """rows [M, in] · Wᵀ in the named form (`form`'s), without the bias; the layer holds the kernel's layout."""
        if form == "kernel" and rows.device.type == "cuda":
            return torch._weight_int4pack_mm(rows.to(torch.bfloat16).contiguous(), self.weight, self.group_size,
                                             self.weight_scale).to(rows.dtype)[:, : self.out_features]
        if form == "kernel":
            return torch._weight_int4pack_mm_for_cpu(rows.contiguous(), self.weight, self.group_size,
                                                     self.weight_scale.to(rows.dtype))[:, : self.out_features]
        dequantize = self._cuda_tile if rows.device.type == "cuda" else self._cpu_tile
        tile = tile_rows(self.in_features, rows.device, multiple=64)
        return dequantized_product(rows.contiguous(), self.out_features, tile,
                                   lambda start, stop: dequantize(start, stop, rows.dtype))

    def _cpu_tile(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Rows start:stop of the weight, transposed [in, stop − start], in `dtype`, from the CPU kernel's layout on
        AVX-512 (`reads_cpu_layout` checks it): each block of 64 rows is [in, 32] bytes, byte j of input k holding row j's level in its low nibble and row
        32 + j's in its high one. The nibbles are split four bytes at a time, converted into the tile in [in, rows]
        order, and one addcmul applies each group's scale and zero: w = q · scale + (zero − 8 · scale), computed in
        fp32 and rounded once (that zero is rounded to `dtype` first, an error the size of a weight's rounding)."""
        inputs, padded = self.in_features, -(-(stop - start) // 64) * 64  # blocks are whole, past out_features too
        blocks, groups = padded // 64, self.in_features // self.group_size
        words = self.weight[start : start + padded].view(blocks, inputs, 32).view(torch.int32)  # [blocks, in, 8]
        levels = scratch("int4 levels", inputs * padded, torch.uint8, words.device).view(blocks, inputs, 2, 32)
        low, high = levels.view(torch.int32).unbind(2)  # each [blocks, in, 8]: rows j's levels, then 32 + j's
        torch.bitwise_and(words, 0x0F0F0F0F, out=low)
        torch.bitwise_right_shift(words, 4, out=high)
        high.bitwise_and_(0x0F0F0F0F)
        weights = scratch("int4 tile", inputs * padded, dtype, words.device).view(inputs, blocks, 2, 32)
        weights.copy_(levels.permute(1, 0, 2, 3))
        both = self.weight_scale[:, start : start + padded].float()  # [groups, rows, (scale, zero)]
        scale, zero = both[..., 0], both[..., 1] - 8 * both[..., 0]
        grouped = weights.view(groups, self.group_size, padded)
        torch.addcmul(zero.to(dtype)[:, None], grouped, scale.to(dtype)[:, None], out=grouped)
        return weights.view(inputs, padded)[:, : stop - start]

    def _cuda_tile(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Rows start:stop (a multiple of 8 from `start`) of the weight, transposed, in `dtype`, from tinygemm's
        layout (`unpack_tinygemm`), with w = (q − 8) · scale + zero as the kernel computes it."""
        first, last = start // 8, -(-stop // 8)
        levels = unpack_tinygemm(self.weight[first:last])[: stop - start]  # [rows, in]
        both = self.weight_scale[:, start:stop].float()  # bf16 [groups, rows, 2]
        centred = levels.view(stop - start, -1, self.group_size).float() - 8
        weights = centred * both[..., 0].T[..., None] + both[..., 1].T[..., None]
        return weights.to(dtype).view(stop - start, self.in_features).T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weights in groups of " \
               f"{self.group_size}"


def quantize_int4(module: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Replace every `nn.Linear` inside `module` (in place) by an `Int4Linear`; returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int4Linear.from_linear(child, group_size))
        else:
            quantize_int4(child, group_size)
    return module


def quantizer(names: list[str], dtype: torch.dtype | None, group_size: int = DEFAULT_GROUP_SIZE
              ) -> Callable[[str, Tensor], dict[str, Tensor]]:
    """A per-tensor hook for `load_checkpoint`: the named weights arrive packed with their scales and zeros (in
    `dtype`), the rest unchanged, so the peak stays near the int4 size."""
    wanted = set(names)

    def convert(name: str, tensor: Tensor) -> dict[str, Tensor]:
        if name not in wanted:
            return {name: tensor.clone()}  # out of the shard's memory map (see int8.quantizer)
        rows, inputs = tensor.shape
        dt = dtype or tensor.dtype
        packed = torch.empty(rows, inputs // 2, dtype=torch.uint8, device=tensor.device)
        scales = torch.empty(rows, inputs // group_size, dtype=dt, device=tensor.device)
        zeros = torch.empty_like(scales)
        for start in range(0, rows, CHUNK_ROWS):  # lm_head's levels alone would take 640 MB at once
            part = slice(start, start + CHUNK_ROWS)
            levels, scales[part], zeros[part] = quantize_weight(tensor[part], group_size)
            packed[part] = pack(levels)
        return {name: packed, name + "_scale": scales, zero_name(name): zeros}

    return convert
