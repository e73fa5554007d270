"""The GPU paths against the CPU's, on the tiny checkpoint: fp32 logits, int8 and int4 layers (tinygemm) against
their dequantized weights, and decoding compiled with CUDA graphs against eager decoding. They need a CUDA GPU and
skip without one; benchmarks/gpu_check.sh runs them first on a GPU machine."""

import pytest
import torch
from torch._dynamo.utils import counters

import qwenaudio
from qwenaudio.core.generate import compile_decoding, generate
from qwenaudio.core.int4 import Int4Linear, unpack_tinygemm
from qwenaudio.core import linear as linear_forms
from qwenaudio.core.int8 import Int8Linear

from .test_linear_forms import quantized

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fp32_logits_on_the_gpu_equal_the_cpu_s(tiny_weights):
    ids = torch.randint(0, 151643, (2, 40), generator=torch.Generator().manual_seed(0))
    cpu = qwenaudio.load(tiny_weights, device="cpu", dtype=torch.float32, progress=False)
    gpu = qwenaudio.load(tiny_weights, device="cuda", dtype=torch.float32, progress=False)
    with torch.no_grad():
        expected, got = cpu.decoder.logits(ids), gpu.decoder.logits(ids.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layers_on_the_gpu_equal_their_dequantized_weights(bits):
    layer, weight = quantized(torch.nn.Linear(256, 200, bias=False).to("cuda", torch.bfloat16), bits)
    for rows in (1, 8, 300):  # decoding's rows and prefill's
        x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            got = layer(x).double()
        expected = x.double() @ weight.T
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("inner_k_tiles", [2, 4, 8])
def test_tinygemm_layout_unpacks_to_the_levels_packed(inner_k_tiles):
    """unpack_tinygemm, which int4's dequantized tiles read (prefill on a GPU), inverts torch's own packing."""
    levels = torch.randint(0, 16, (64, 512), dtype=torch.uint8, device="cuda")
    packed = torch._convert_weight_to_int4pack((levels[:, 0::2] << 4) | levels[:, 1::2], inner_k_tiles)
    assert torch.equal(unpack_tinygemm(packed), levels)


def test_int4_tiles_on_the_gpu_equal_tinygemm(monkeypatch):
    monkeypatch.setattr(linear_forms, "TILE_ELEMENTS_CUDA", 4096 * 64)  # 16 tiles of 64 rows, the last one short
    linear = torch.nn.Linear(4096, 1000, bias=False).to("cuda", torch.bfloat16)
    layer = Int4Linear.from_linear(linear, 64)
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x[:1])
        kernel, tiles = layer.product(x, "kernel").double(), layer.product(x, "dequantize").double()
    torch.testing.assert_close(tiles, kernel, rtol=2e-2, atol=2e-2 * float(kernel.abs().max()))


def test_int8_decoding_compiled_on_the_gpu_equals_its_dequantized_weights():
    """One row compiled takes the fused products-and-sum form (no int8 kernel on CUDA)."""
    linear = torch.nn.Linear(256, 200, bias=False).to("cuda", torch.bfloat16)
    layer = Int8Linear.from_linear(linear)
    weight = layer.weight.double() * layer.weight_scale.double()[:, None]
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True)(x).double()
    expected = x.double() @ weight.T
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_the_loss_and_forward_on_the_gpu_take_a_host_mask_and_equal_the_cpu_s(tiny_weights):
    """Training on a GPU: the tokenizer's attention mask stays on the host (this once failed with a device
    mismatch in the full-size LoRA benchmark)."""
    ids = torch.randint(0, 151643, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    labels = ids.clone()
    labels[:, :12] = -100
    cpu = qwenaudio.load(tiny_weights, device="cpu", dtype=torch.float32, progress=False)
    gpu = qwenaudio.load(tiny_weights, device="cuda", dtype=torch.float32, progress=False)
    for model in (cpu, gpu):
        model.train()
    expected, got = cpu.loss(ids, labels, mask), gpu.loss(ids, labels, mask)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=0)
    with torch.no_grad():
        expected, got = cpu(ids, mask), gpu(ids, mask).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("int4", [False, True])
def test_decoding_compiled_with_cuda_graphs_equals_eager_decoding(tiny_weights, int4):
    model = qwenaudio.load(tiny_weights, device="cuda", dtype=torch.bfloat16, quantize="int4" if int4 else None,
                           progress=False)
    ids = torch.randint(0, 151643, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    config = model.generation_config.replace(do_sample=False, max_new_tokens=16, min_new_tokens=16)
    counters.clear()
    with torch.no_grad():
        eager = generate(model.decoder, model.tokenizer, ids, config=config)
        compiled = generate(model.decoder, model.tokenizer, ids, config=config,
                            step=compile_decoding(mode="reduce-overhead"))
    assert compiled == eager
    assert counters["inductor"]["cudagraph_skips"] == 0  # the step ran as a CUDA graph, not merely compiled
