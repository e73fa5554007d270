"""Which form of a linear layer's product is fastest, per weight format and row count, on this machine.

    python benchmarks/linear_forms.py [--device cuda] [--rows 1 2 4 8 12 16 32 64 758] [--paths] [--json out.json]

One layer of the decoder's widest shape (the first MLP projection, 11008 × 4096), random weights, run over enough
copies of it (1 GiB on a CPU, 4 GiB on a GPU) that the weights come from memory, as in a decoding step, not from a
cache. For each activation dtype, weight format and row count it times every form the library can take
(core/linear.py): the float GEMM and, for one bf16 row, ATen's matrix-vector kernel; int8's and int4's kernels and
the tile-by-tile dequantized GEMM. It prints milliseconds per product, the form the library chooses, and the
crossovers that core/linear.py's FORMS should hold for this machine (its key is printed with them).

`--paths` adds the table for one bf16 row: every way PyTorch offers to compute it, as GB/s of weights read and as a
share of the copy bandwidth measured in the same run (issue 27: which reaches 75 %).
"""

from __future__ import annotations

import argparse
import copy
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F

import bench  # its `timed` and `stream_bandwidth`, on the device main() sets
from qwenaudio.core.int4 import Int4Linear
from qwenaudio.core.int8 import Int8Linear
from qwenaudio.core.linear import float_product, machine, takes_gemv, without_onednn
from json_output import json_path, write_json  # a sibling: --json checked first, written atomically

OUT, IN = 11008, 4096
GEMV_ROWS = 8  # beyond it ATen's gemv is several times slower than the GEMM (4× at 8 rows): not timed
DEVICE = torch.device("cpu")


def copies(layer: torch.nn.Module, total: int) -> list[torch.nn.Module]:
    """Copies of `layer` totalling about `total` bytes, so that cycling through them reads from memory."""
    return [layer] + [copy.deepcopy(layer) for _ in range(-(-total // bench.tensor_bytes(layer)) - 1)]


def per_product(layers: list, fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], x: torch.Tensor,
                repeats: int) -> float:
    """Milliseconds per product, cycling over the layers."""
    return bench.timed(lambda: [fn(layer, x) for layer in layers], repeats) / len(layers) * 1e3


@torch.no_grad()
def forms_table(args, total: int) -> list[dict]:
    """ms per product of every form, per activation dtype, format and row count."""
    rows_out = []
    torch.manual_seed(0)
    base = torch.nn.Linear(IN, OUT, bias=False, device=DEVICE)
    torch.nn.init.normal_(base.weight, std=0.02)
    for dtype in args.dtypes:
        linear = torch.nn.Linear(IN, OUT, bias=False, device=DEVICE, dtype=getattr(torch, dtype))
        linear.weight.copy_(base.weight)
        int8 = Int8Linear.from_linear(linear)
        int4 = Int4Linear.from_linear(linear)
        int4(torch.zeros(1, IN, device=DEVICE, dtype=linear.weight.dtype))  # packs it for the device's kernel
        formats = {
            "float": (copies(linear, total), {"GEMM": lambda m, x: F.linear(x, m.weight),
                                              "gemv": lambda m, x: gemv_call(lambda: F.linear(x, m.weight))}),
            "int8": (copies(int8, total), {"kernel": lambda m, x: m.product(x, "kernel"),
                                           "dequantize": lambda m, x: m.product(x, "dequantize")}),
            "int4": (copies(int4, total), {"kernel": lambda m, x: m.product(x, "kernel"),
                                           "dequantize": lambda m, x: m.product(x, "dequantize")}),
        }
        formats = {name: formats[name] for name in args.formats}
        if DEVICE.type == "cuda" and "int8" in formats:
            del formats["int8"][1]["kernel"]  # CUDA has no int8 kernel
        if "float" in formats and (dtype != "bfloat16" or DEVICE.type != "cpu"):
            del formats["float"][1]["gemv"]  # the same kernel as the GEMM (core/linear.py)
        for name, (layers, forms) in formats.items():
            for rows in args.rows:
                x = torch.randn(rows, IN, device=DEVICE, dtype=linear.weight.dtype)
                repeats = args.repeats if rows <= 64 else max(1, args.repeats // 2)
                times = {form: per_product(layers, fn, x, repeats) for form, fn in forms.items()
                         if not (form == "gemv" and rows > GEMV_ROWS)}
                chosen = chosen_form(name, layers[0], x)
                rows_out.append({"dtype": dtype, "format": name, "rows": rows, "ms": times, "chosen": chosen})
                print(f"{dtype:<9} {name:<6} {rows:>5} rows  " +
                      "  ".join(f"{form} {ms:8.2f} ms" for form, ms in times.items()) + f"   chosen: {chosen}",
                      flush=True)
            del layers
    return rows_out


def gemv_call(fn: Callable[[], object]) -> object:
    """`fn()` with its products through ATen's matrix-vector kernel, whatever the rows."""
    with without_onednn():
        return fn()


def chosen_form(name: str, layer: torch.nn.Module, x: torch.Tensor) -> str:
    """The form the library takes for these rows."""
    if name != "float":
        return layer.form(x, x.shape[0])
    return "gemv" if takes_gemv(x.shape[0], x.dtype, x.device) else "GEMM"


FORM_KEYS = {("float", "bfloat16"): "bf16 gemv", ("int8", "bfloat16"): "int8", ("int8", "float32"): "int8 fp32",
             ("int4", "bfloat16"): "int4", ("int4", "float32"): "int4 fp32"}


def crossovers(rows: list[dict]) -> dict[str, int]:
    """Per FORMS key: the largest row count up to which the format's own kernel (or gemv) was fastest at every
    measured count (rows come in ascending order per series)."""
    found: dict[str, list] = {}
    for row in rows:
        own = "gemv" if row["format"] == "float" else "kernel"
        if own not in row["ms"]:
            continue
        run = found.setdefault(FORM_KEYS[row["format"], row["dtype"]], [0, True])  # [rows so far, unbroken]
        if run[1] and min(row["ms"], key=row["ms"].get) == own:
            run[0] = row["rows"]
        else:
            run[1] = False
    return {key: run[0] for key, run in found.items()}


@torch.no_grad()
def paths_table(total: int, stream: float, repeats: int) -> list[dict]:
    """One bf16 row through the 11008 × 4096 layer by every path PyTorch offers, on cold weights."""
    torch.manual_seed(0)
    weight = (torch.randn(OUT, IN, device=DEVICE) * 0.02).to(torch.bfloat16)
    weights = [weight] + [weight.clone() for _ in range(-(-total // (weight.numel() * 2)) - 1)]
    x = torch.randn(1, IN, device=DEVICE, dtype=torch.bfloat16)
    results = []

    def path(name: str, fn: Callable[[torch.Tensor], object], operands=None) -> None:
        operands = weights if operands is None else operands
        try:
            seconds = bench.timed(lambda: [fn(w) for w in operands], repeats)
        except Exception as error:  # a path this torch lacks is a row saying so
            print(f"{name:<58} failed: {type(error).__name__}: {str(error)[:80]}")
            results.append({"path": name, "error": f"{type(error).__name__}: {error}"[:200]})
            return
        rate = len(operands) * weight.numel() * 2 / seconds / 1e9
        results.append({"path": name, "GB/s": rate, "stream_share": rate / stream})
        print(f"{name:<58} {rate:6.1f} GB/s {rate / stream:5.0%} of copy", flush=True)

    path("read only: a sum over the weights (the ceiling)", lambda w: w.sum())
    path("F.linear: oneDNN matmul (torch's default)", lambda w: F.linear(x, w))
    path("core.linear.float_product: ATen's gemv (oneDNN off)", lambda w: float_product(x, w))
    path("W @ xᵀ", lambda w: w @ x.T)
    path("torch.mv(W, x)", lambda w: torch.mv(w, x[0]))
    path("torch.mv(W, x), oneDNN off", lambda w: gemv_call(lambda: torch.mv(w, x[0])))
    transposed = [w.T.contiguous() for w in weights]
    path("x @ Wt, Wt [in, out] stored contiguous", lambda w: x @ w, transposed)
    del transposed
    path("F.linear over 4 chunks of rows", lambda w: torch.cat([F.linear(x, p) for p in w.chunk(4)], -1))
    if hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or hasattr(torch._C._nn, "mkldnn_reorder_linear_weight"):
        reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) or torch._C._nn.mkldnn_reorder_linear_weight
        try:
            packed = [reorder(w, 1) for w in weights]
            path("oneDNN prepacked weight (mkldnn._linear_pointwise)",
                 lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], ""), packed)
            del packed
        except Exception as error:
            print(f"oneDNN prepacking failed: {type(error).__name__}: {str(error)[:80]}")
    try:
        blocked = [w.to_mkldnn() for w in weights]
        path("mkldnn tensors (torch._C._nn.mkldnn_linear)", lambda w: torch._C._nn.mkldnn_linear(x.to_mkldnn(), w),
             blocked)
        del blocked
    except Exception as error:
        print(f"mkldnn tensors failed: {type(error).__name__}: {str(error)[:80]}")
    compiled = torch.compile(lambda x, w: F.linear(x, w), dynamic=False)
    path("torch.compile (inductor, default)", lambda w: compiled(x, w))
    summed = torch.compile(lambda x, w: (x.float() * w).sum(-1).to(torch.bfloat16), dynamic=False)
    path("torch.compile of products and a sum (fp32)", lambda w: summed(x, w))
    autotuned = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune", dynamic=False)
    path("torch.compile max-autotune (C++ GEMM template)", lambda w: autotuned(x, w))
    path("torch.compile (inductor), oneDNN off at run time", lambda w: gemv_call(lambda: compiled(x, w)))
    frozen = frozen_linears(weights, x)
    if frozen is not None:
        path("inductor freezing + max-autotune (prepacked weights)", lambda m: m(x), frozen)
    threads = torch.get_num_threads()
    for n in sorted({1, threads} - {threads}):
        torch.set_num_threads(n)
        path(f"F.linear, {n} thread(s)", lambda w: F.linear(x, w))
        path(f"ATen's gemv, {n} thread(s)", lambda w: float_product(x, w))
    torch.set_num_threads(threads)
    return results


def frozen_linears(weights: list[torch.Tensor], x: torch.Tensor) -> list | None:
    """Each weight in an nn.Linear compiled with inductor's freezing (weights folded in as constants and prepacked
    for oneDNN) and max-autotune; None where this torch cannot."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor
    previous = inductor.freezing
    inductor.freezing = True
    dynamo.recompile_limit = max(dynamo.recompile_limit, len(weights) + 1)  # each copy is its own graph
    try:
        modules = []
        for w in weights:
            linear = torch.nn.Linear(IN, OUT, bias=False, device=DEVICE, dtype=torch.bfloat16).eval()
            linear.weight = torch.nn.Parameter(w, requires_grad=False)
            module = torch.compile(linear, mode="max-autotune", dynamic=False)
            module(x)
            modules.append(module)
        return modules
    except Exception as error:
        print(f"freezing failed: {type(error).__name__}: {str(error)[:80]}")
        return None
    finally:
        inductor.freezing = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32, 64, 758])
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16"])
    parser.add_argument("--formats", nargs="*", choices=("float", "int8", "int4"), default=["float", "int8", "int4"],
                        help="the formats whose forms are timed (none: only --paths)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", action="store_true", help="also every path for one bf16 row (CPU)")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: a 512 × 256 layer, figures meaning nothing")
    parser.add_argument("--json", type=json_path, help="also write the rows and the setup here")
    args = parser.parse_args()
    global DEVICE, OUT, IN
    DEVICE = bench.DEVICE = torch.device(args.device)
    if args.tiny:
        OUT, IN = 512, 256
    total = 2**22 if args.tiny else 2**32 if DEVICE.type == "cuda" else 2**30
    stream = bench.stream_bandwidth()
    setup = {"machine": machine(DEVICE), "processor": platform.processor(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
             "layer": f"{OUT} x {IN}", "copies_bytes": total, "stream_gb_s": stream}
    print(f"# {setup}")
    rows = forms_table(args, total)
    found = crossovers(rows)
    print(f"# FORMS[{machine(DEVICE)!r}] measured: {found}")
    paths = paths_table(total, stream, args.repeats) if args.paths and DEVICE.type == "cpu" else []
    if args.json:
        write_json(args.json, {"setup": setup, "forms": rows, "crossovers": found, "paths": paths})


if __name__ == "__main__":
    main()
