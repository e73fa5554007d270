"""Which form computes a linear layer's product (core/linear.py): each form against a float64 reference, the
choice per row count from FORMS, tinygemm's CUDA layout against an independent packer, and the goldens' greedy
replies the same whichever form computes them."""

import contextlib
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import qwenaudio
from qwenaudio.core import generate, int4, linear
from qwenaudio.core.decoder import KVCache
from qwenaudio.core.int4 import Int4Linear, dequantize, quantize_weight, unpack_tinygemm
from qwenaudio.core.int8 import Int8Linear
from qwenaudio.core.linear import FORMS, dequantized_product, float_product, max_rows, scratch

from .conftest import golden_prompt_logits
from .test_generate import CASES, generate_case


def close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 output: 8 significant bits
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


def quantized(source: torch.nn.Linear, bits: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """An int8 or int4 (groups of 64) layer of `source` and the float64 weight it stands for."""
    if bits == 8:
        layer = Int8Linear.from_linear(source)
        return layer, layer.weight.double() * layer.weight_scale.double()[:, None]
    levels, scales, zeros = quantize_weight(source.weight, 64)
    dtype = source.weight.dtype
    return Int4Linear.from_linear(source, 64), dequantize(levels, scales.to(dtype), zeros.to(dtype), torch.float64)


def test_one_bf16_row_goes_through_atens_gemv_with_onednn_off_only_for_that_call(monkeypatch):
    seen = []

    def spy(x, weight, bias=None):
        seen.append((x.shape[0], x.dtype, torch._C._get_mkldnn_enabled()))
        return F.linear(x, weight, bias)

    monkeypatch.setattr(linear, "F", SimpleNamespace(linear=spy))
    weight, bias = torch.randn(300, 64).bfloat16(), torch.randn(300).bfloat16()
    for rows, dtype in [(1, torch.bfloat16), (2, torch.bfloat16), (1, torch.float32)]:
        x = torch.randn(rows, 64, dtype=dtype)
        got = float_product(x, weight.to(dtype), bias.to(dtype))
        close(got, x.double() @ weight.double().T + bias.double(), dtype)
    assert seen == [(1, torch.bfloat16, False), (2, torch.bfloat16, True), (1, torch.float32, True)]
    assert torch._C._get_mkldnn_enabled()


def test_onednn_comes_back_on_after_two_threads_interleave():
    """A enters, B enters, A leaves, B leaves: each saving and restoring the flag for itself would leave it off."""
    steps = [threading.Event() for _ in range(3)]

    def thread_a():
        with linear.without_onednn():
            steps[0].set()
            steps[1].wait(5)
        steps[2].set()

    a = threading.Thread(target=thread_a)
    a.start()
    steps[0].wait(5)
    with linear.without_onednn():
        steps[1].set()
        steps[2].wait(5)
        assert not torch._C._get_mkldnn_enabled()  # A has left, B is still inside
    a.join()
    assert torch._C._get_mkldnn_enabled()


def test_onednn_is_turned_back_on_when_the_product_fails(monkeypatch):
    monkeypatch.setattr(linear, "F", SimpleNamespace(linear=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        float_product(torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16())
    assert torch._C._get_mkldnn_enabled()


def test_the_decoders_linears_compute_through_float_product(tiny_ckpt):
    model = qwenaudio.load(tiny_ckpt, dtype=torch.bfloat16, progress=False)
    linears = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, linear.Linear) for m in linears)


def test_a_product_tile_by_tile_equals_the_whole_one():
    weight, x = torch.randn(50, 24, dtype=torch.float64), torch.randn(9, 24, dtype=torch.float64)
    tiles = []
    y = dequantized_product(x, 50, 16, lambda start, stop: tiles.append((start, stop)) or weight[start:stop].T)
    assert tiles == [(0, 16), (16, 32), (32, 48), (48, 50)]
    torch.testing.assert_close(y, x @ weight.T)


def test_each_thread_has_its_own_scratch_buffers():
    mine = scratch("test", 10, torch.float32, torch.device("cpu"))
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(scratch("test", 10, torch.float32, torch.device("cpu"))))
    thread.start()
    thread.join()
    assert mine.data_ptr() != theirs[0].data_ptr()
    assert scratch("test", 8, torch.float32, torch.device("cpu")).data_ptr() == mine.data_ptr()  # kept, reused


def test_the_crossovers_are_this_machines_or_the_default(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(linear, "CPU_MACHINE", "avx512+bf16")
    assert max_rows("int8", cpu) == FORMS["avx512+bf16"]["int8"]
    monkeypatch.setattr(linear, "CPU_MACHINE", "some new cpu")
    assert max_rows("int4", cpu) == linear.DEFAULT_FORMS["int4"]
    assert max_rows("int4", cuda) == FORMS["cuda"]["int4"] and max_rows("int8", torch.device("mps")) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_takes_its_kernel_up_to_the_crossover_and_tiles_beyond(dtype):
    layer, weight = quantized(torch.nn.Linear(96, 40).to(dtype), 8)
    kernel_rows = max_rows("int8 fp32" if dtype == torch.float32 else "int8", torch.device("cpu"))
    for rows, form in [(1, "kernel"), (kernel_rows, "kernel"), (kernel_rows + 1, "dequantize"), (300, "dequantize")]:
        x = torch.randn(rows, 96, dtype=dtype)
        assert Int8Linear.form(x, rows) == form
        with torch.no_grad():
            close(layer(x), x.double() @ weight.T + layer.bias.double(), dtype)
            for other in ("kernel", "dequantize", "convert"):
                close(layer.product(x, other), x.double() @ weight.T, dtype)


def test_int8_under_autograd_converts_the_whole_weight():
    layer, weight = quantized(torch.nn.Linear(96, 40), 8)
    x = torch.randn(300, 96, requires_grad=True)
    assert Int8Linear.form(x, 300) == "convert"
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad.double(), weight.sum(0).expand(300, -1), rtol=1e-5, atol=1e-5)


def test_int8_tiles_equal_converting_the_whole_weight_exactly(monkeypatch):
    """Tiling changes where the weight is converted, not one product: prefill keeps its numbers bit for bit."""
    monkeypatch.setattr(linear, "TILE_ELEMENTS", 96 * 16)  # 40 rows: tiles of 16, 16 and 8
    layer, _ = quantized(torch.nn.Linear(96, 40).bfloat16(), 8)
    x = torch.randn(30, 96, dtype=torch.bfloat16)
    assert torch.equal(layer.product(x, "dequantize"), layer.product(x, "convert"))


# 4100 rows: lm_head's case, 33 tiles of 128 rows, the last one padded to a multiple of 64 in the kernel's layout.
@pytest.mark.parametrize("dtype,out,group_size", [(torch.bfloat16, 40, 32), (torch.bfloat16, 4100, 64),
                                                  (torch.float32, 200, 128), (torch.bfloat16, 100, 128)])
def test_int4_dequantized_tiles_equal_the_kernel_and_the_dequantized_weight(dtype, out, group_size, monkeypatch):
    monkeypatch.setattr(linear, "TILE_ELEMENTS", 256 * 128)  # 128-row tiles
    source = torch.nn.Linear(256, out, bias=False).to(dtype)
    levels, scales, zeros = quantize_weight(source.weight, group_size)
    weight = dequantize(levels, scales.to(dtype), zeros.to(dtype), torch.float64)
    layer = Int4Linear.from_linear(source, group_size)
    x = torch.randn(70, 256, dtype=dtype)
    with torch.no_grad():
        layer(x[:1])  # packs it
        kernel, tiles = layer.product(x, "kernel"), layer.product(x, "dequantize")
    close(tiles, x.double() @ weight.T, dtype)
    close(tiles, kernel.double(), dtype)


def test_int4_takes_its_kernel_up_to_the_crossover_and_where_its_packing_is_not_read(monkeypatch):
    layer = Int4Linear.from_linear(torch.nn.Linear(128, 64, bias=False).bfloat16(), 64)
    rows = max_rows("int4", torch.device("cpu"))
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    assert layer.form(x, 1) == layer.form(x, rows) == "kernel" and layer.form(x, rows + 1) == "dequantize"
    monkeypatch.setattr(int4, "reads_cpu_layout", lambda: False)
    assert layer.form(x, rows + 1) == "kernel"


@pytest.mark.slow  # a Python process
def test_on_avx2_the_packing_differs_and_int4_keeps_its_kernel():
    """torch packs int4 per vector capability; where it is not AVX-512's, prefill stays in the kernel, right."""
    code = ("import torch; from qwenaudio.core.int4 import Int4Linear, reads_cpu_layout, dequantize, quantize_weight\n"
            "lin = torch.nn.Linear(128, 100).bfloat16(); layer = Int4Linear.from_linear(lin, 64)\n"
            "x = torch.randn(2, 150, 128).bfloat16()\n"
            "levels, scales, zeros = quantize_weight(lin.weight, 64)\n"
            "w = dequantize(levels, scales.bfloat16(), zeros.bfloat16(), torch.float64)\n"
            "y = layer(x).double(); ref = x.double() @ w.T + lin.bias.double()\n"
            "assert not reads_cpu_layout() and layer.form(x, 300) == 'kernel'\n"
            "assert (y - ref).abs().max() < 2e-2 * ref.abs().max(), (y - ref).abs().max()\n"
            "print(torch.backends.cpu.get_cpu_capability())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    assert done.returncode == 0 and done.stdout.strip() == "AVX2", done.stderr[-2000:]


@pytest.mark.parametrize("bits", [8, 4])
def test_a_batch_of_sequences_with_bias_in_each_form(bits):
    """[B, S, in] inputs with a bias, as the decoder feeds them, below and above the crossover."""
    source = torch.nn.Linear(128, 96).bfloat16()
    layer, weight = quantized(source, bits)
    for shape in [(1, 1, 128), (3, 150, 128)]:
        x = torch.randn(*shape).bfloat16()
        with torch.no_grad():
            got = layer(x)
        assert got.shape == (*shape[:2], 96)
        close(got, x.double() @ weight.T + source.bias.double(), torch.bfloat16)


def pack_like_tinygemm(levels: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """What torch._convert_weight_to_int4pack writes on CUDA, element by element from the packing kernel's own
    index arithmetic (aten/src/ATen/native/cuda/int4mm.cu, matrix_to_m16n8k16_Bint4_layout), independently of
    the permutation unpack_tinygemm inverts: output [tile, o, lane, j] packs bytes kb, kb + 4, kb + 8, kb + 12 of
    row 8 · tile + lane // 4 (kb = (o · k_tiles + 2j) · 8 + lane % 4; a byte holds input 2b high, 2b + 1 low) as
    their low nibbles in bits 16–31 and high nibbles in bits 0–15, the last byte's most significant."""
    rows, inputs = levels.shape
    data = levels.to(torch.int64)
    byte = (data[:, 0::2] << 4) | data[:, 1::2]
    tiles, outer, half = rows // 8, inputs // (16 * inner_k_tiles), inner_k_tiles // 2
    out = torch.empty(tiles, outer, 32, half, dtype=torch.int64)
    for tile in range(tiles):
        for o in range(outer):
            for lane in range(32):
                for j in range(half):
                    kb = (o * inner_k_tiles + 2 * j) * 8 + lane % 4
                    v = [int(byte[8 * tile + lane // 4, kb + d]) for d in (0, 4, 8, 12)]
                    out[tile, o, lane, j] = sum((v[i] & 15) << (16 + 4 * i) for i in range(4)) | \
                        sum((v[i] >> 4) << (4 * i) for i in range(4))
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_tinygemm_levels_unpack_from_an_independent_packing(inner_k_tiles):
    levels = torch.randint(0, 16, (24, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_like_tinygemm(levels, inner_k_tiles)
    assert torch.equal(unpack_tinygemm(packed), levels)
    assert torch.equal(unpack_tinygemm(packed[1:3]), levels[8:24])  # a tile of rows alone


# The forms before this change, per variant: bf16 through oneDNN alone, int8's kernel up to 32 rows (converting the
# whole weight beyond, which tiles reproduce bit for bit), int4's kernel for every product.
BEFORE = {"bf16": {"bf16 gemv": 0}, "int8": {"int8": 32}, "int8 fp32": {"int8 fp32": 2}, "int4": {"int4": 10**6}}


def load_variant(tiny_ckpt, variant: str):
    dtype = torch.float32 if variant == "int8 fp32" else torch.bfloat16
    return qwenaudio.load(tiny_ckpt, dtype=dtype, quantize=None if variant == "bf16" else variant.split()[0],
                          progress=False)


def with_forms(monkeypatch, changes: dict[str, int]) -> None:
    forms = {**linear.FORMS.get(linear.CPU_MACHINE, linear.DEFAULT_FORMS), **changes}
    monkeypatch.setattr(linear, "FORMS", {**linear.FORMS, linear.CPU_MACHINE: forms})


@pytest.mark.slow  # 4 models, 7 golden cases generated twice
@pytest.mark.parametrize("variant", list(BEFORE))
def test_the_forms_chosen_change_no_greedy_reply_on_the_goldens(tiny_ckpt, variant, monkeypatch):
    """Every golden generation case, greedy, with the forms chosen now against the forms before: the same ids. But
    one: int4's prefill through bf16 tiles (the kernel dequantizes in fp32) moves batch_undecodable's second row at
    step 8, the step where the tiny random model's best id is one without text (test_generate: a near-tie the
    default choice resolves); the next test bounds the logits there."""
    model = load_variant(tiny_ckpt, variant)
    now = [generate_case(model, case) for case in CASES.values()]
    with_forms(monkeypatch, BEFORE[variant])
    before = [generate_case(model, case) for case in CASES.values()]
    for name, ours, theirs in zip(CASES, now, before):
        if variant == "int4" and name == "batch_undecodable":
            assert ours[0] == theirs[0] and ours[1][:8] == theirs[1][:8]
        else:
            assert ours == theirs, name


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_the_forms_move_no_logit_that_decides_a_golden_prompt(tiny_ckpt, variant, monkeypatch):
    """Teacher forced over the golden prompts: the tiles' logits within 2 % of the largest of the kernel's (int4:
    1.3 %, the size of bf16's own rounding here, which moves logits 1.1 % from fp32's), and the same best id
    wherever the kernel's top two are further apart than twice that difference."""
    model = load_variant(tiny_ckpt, variant)
    for case in CASES:
        if case not in ("asr", "timestamps", "batch"):
            continue
        with_forms(monkeypatch, {variant: 10**6})
        [kernel] = golden_prompt_logits(case, model)
        with_forms(monkeypatch, {variant: 0})
        [tiles] = golden_prompt_logits(case, model)
        error = (tiles.float() - kernel.float()).abs().amax(-1)
        assert error.max() < 2e-2 * kernel.abs().max()
        top2 = kernel.float().topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 2 * error
        assert decided.float().mean() > 0.25  # random weights: flat distributions, many near-ties
        assert torch.equal(tiles.argmax(-1)[decided], kernel.argmax(-1)[decided])


@pytest.mark.slow  # torch.compile
def test_a_compiled_one_row_bf16_step_takes_atens_gemv_and_equals_eager(tiny_ckpt, monkeypatch):
    """compile_decoding runs a bf16 step of one row with oneDNN off (the graph's products then take ATen's gemv, as
    eager ones do) and a step of two rows with it on; the numbers are eager decoding's to bf16 rounding."""
    switched = []

    @contextlib.contextmanager
    def recorded():
        switched.append(True)
        with linear.without_onednn():
            yield

    monkeypatch.setattr(generate, "without_onednn", recorded)
    decoder = qwenaudio.load_decoder(tiny_ckpt, dtype=torch.bfloat16)
    step = generate.compile_decoding()
    for rows in (1, 2):
        ids = torch.randint(0, 151643, (rows, 9), generator=torch.Generator().manual_seed(rows))
        logits = {}
        for name, fn in (("eager", generate.decode_one_token), ("compiled", step)):
            session = generate.Session(KVCache(decoder.config, rows, 12, torch.bfloat16))
            with torch.no_grad():
                generate.prefill(decoder, session, ids[:, :8])
                logits[name] = fn(decoder, session.cache, ids[:, 8:], torch.tensor([8]), session.rope_base)
        close(logits["compiled"], logits["eager"].double(), torch.bfloat16)
        assert switched == [True]  # the one-row step only
