"""Int8 weight-only quantization: the layer math, and accuracy against fp32 on the golden generation prompts."""

import json

import pytest
import torch

import qwenaudio
from qwenaudio import load_audio
from qwenaudio.quantize import Int8Linear, quantize_int8, quantize_weight

from .conftest import GOLDEN, ROOT

CASES = json.loads((GOLDEN / "generation_official.json").read_text(encoding="utf-8"))["generation"]


def test_weight_round_trip_is_within_half_a_step():
    w = torch.randn(48, 96) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different scales
    q, scales = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scales.shape == (48,)
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("shape", [(1, 96), (2, 2, 96), (3, 5, 96)])  # the int8 kernel, then the converting path
def test_int8_linear_matches_its_dequantized_weights(shape):
    linear = torch.nn.Linear(96, 40)
    layer = Int8Linear(linear)
    x = torch.randn(*shape)
    reference = x @ (layer.weight.float() * layer.scales[:, None]).T + linear.bias
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


def test_decoder_linears_are_replaced(tiny_ckpt):
    decoder = quantize_int8(qwenaudio.load_decoder(tiny_ckpt, dtype=torch.float32))
    assert isinstance(decoder.h[0].attn.c_attn, Int8Linear) and isinstance(decoder.lm_head, Int8Linear)
    assert decoder.h[0].mlp.w1.weight.dtype == torch.int8 and decoder.wte.weight.dtype == torch.float32


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    fp32 = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    int8 = qwenaudio.load(tiny_ckpt, dtype=torch.float32, progress=False)
    quantize_int8(int8.decoder)
    return fp32, int8


@pytest.mark.parametrize("case", ["asr", "timestamps", "batch"])
def test_int8_agrees_with_fp32_wherever_fp32_is_decided(models, case):
    """Measured on the tiny checkpoint: logits within 1.4e-2 relative of fp32. Random weights give nearly flat
    next-token distributions, so greedy runs drift apart where fp32's top two are closer than the quantization
    error; wherever fp32's margin exceeds twice that error, int8 must pick the same token."""
    fp32, int8 = models
    c = CASES[case]
    clips = [load_audio(ROOT / u) for urls in c["audio_urls"] for u in urls]
    batch = fp32.tokenizer.encode_batch(c["texts"], audio_spans=c["audio_span_tokens"])
    with torch.no_grad():
        logits = [m.decoder(batch.input_ids, attention_mask=batch.attention_mask, audio=m.encode_audio(clips))
                  for m in (fp32, int8)]
    real = batch.attention_mask.bool()
    exact, quantized = logits[0][real], logits[1][real]
    error = (quantized - exact).abs().amax(-1)
    assert (error.max() / exact.abs().max()) < 2e-2
    top2 = exact.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * error
    assert decided.any()
    assert torch.equal(quantized.argmax(-1)[decided], exact.argmax(-1)[decided])
