"""Speed of qwenaudio against its closest maintained peer, on the same weights in the same process.

    python benchmarks/bench.py [--decoder-layers 2] [--encoder-layers 2] [--json results.json]

The peer is transformers' Qwen2-Audio encoder and Qwen2 decoder (`Qwen2AudioEncoder`, `Qwen2ForCausalLM`) with
our tensors loaded into them (q/k/v split out of c_attn; up = w1, gate = w2, down = c_proj); below seq_length
their math is Qwen-Audio's (tests/test_encoder.py and test_decoder.py check it). Both sides share the embedding
and lm_head tensors, so the full-width model fits in memory twice.

Dimensions are full size (hidden 4096, encoder 1280, vocabulary 155,947) with random weights and fewer layers,
so a CPU finishes in minutes; the layer counts are printed with the results. Each figure is the median of
`--repeats` timed runs after one warm-up, in fp32 (the fast dtype on CPUs). Rows:
- encoder: log-mel to projected features, for 5 s and 30 s of audio;
- prefill: the prompt of a 30 s ASR request (752 audio positions + 6 tags = 758 tokens), tokens per second, as
  generation runs it on both sides (KV cache filled, logits of the last position only);
- decode: one token per step after that prompt, batch 1 and 8, tokens per second (a step with ours is the
  static-KV-cache path generation uses; with the peer, a forward with its DynamicCache, as HF generate runs);
- the same prefill and batch-1 decode with our decoder's linears in int8 (`qwenaudio.quantize`), against the
  peer in fp32;
- time to first token: encoder + prefill for the 30 s request (fp32); real-time factor: encoder + prefill + 32 decoded
  tokens, over 30 s; peak memory: the process's peak resident set size at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch
from transformers import Qwen2AudioEncoderConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from qwenaudio import QwenAudioConfig
from qwenaudio.audio import log_mel_spectrogram
from qwenaudio.decoder import Decoder
from qwenaudio.encoder import AudioEncoder
from qwenaudio.quantize import quantize_int8
from qwenaudio.testing import qwen2_audio_encoder_weights, qwen2_decoder_weights, tiny_config

PROMPT_TOKENS = 758  # a 30 s clip (span 752) + the 6 ASR tags


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(decoder_layers: int, encoder_layers: int):
    """Our encoder and decoder with random full-width weights, and the peer modules sharing those tensors."""
    config = QwenAudioConfig.from_dict(tiny_config(hidden_size=4096, num_attention_heads=32, kv_channels=128,
                                                   intermediate_size=22016, num_hidden_layers=decoder_layers,
                                                   n_state=1280, n_head=20, n_layer=encoder_layers))
    torch.manual_seed(0)
    encoder, decoder = AudioEncoder(config.audio).eval(), Decoder(config).eval()
    for module in (encoder, decoder):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    encoder.positional_embedding.normal_()

    peer_encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(
        num_mel_bins=80, encoder_layers=encoder_layers, encoder_attention_heads=20, encoder_ffn_dim=5120,
        d_model=1280, max_source_positions=1500)).eval()
    peer_encoder.load_state_dict(qwen2_audio_encoder_weights(encoder.state_dict()), strict=True, assign=True)

    peer = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=4096, intermediate_size=config.mlp_width,
        num_hidden_layers=decoder_layers, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        attn_implementation="sdpa")).eval()
    peer.load_state_dict(qwen2_decoder_weights(decoder.state_dict()), strict=True, assign=True)
    return config, encoder, decoder, peer_encoder, peer


@torch.no_grad()
def run(args) -> list[dict]:
    config, encoder, decoder, peer_encoder, peer = build(args.decoder_layers, args.encoder_layers)
    rows = []

    def row(name: str, unit: str, ours: float, theirs: float, higher_is_better: bool) -> None:
        ratio = ours / theirs if higher_is_better else theirs / ours  # > 1: qwenaudio is faster
        rows.append({"benchmark": name, "unit": unit, "qwenaudio": ours, "transformers": theirs, "speedup": ratio})
        print(f"{name:<28} {unit:<9} {ours:>12.3f} {theirs:>14.3f} {ratio:>8.2f}x", flush=True)

    print(f"{'benchmark':<28} {'unit':<9} {'qwenaudio':>12} {'transformers':>14} {'speedup':>9}")
    for seconds in (5, 30):
        samples = seconds * 16000
        mel = log_mel_spectrogram(torch.randn(samples) * 0.1)[None]
        ours = timed(lambda: encoder.encode(mel, [samples]), args.repeats)
        theirs = timed(lambda: encoder.proj(peer_encoder(mel).last_hidden_state), args.repeats)  # the peer needs 30 s
        row(f"encoder {seconds} s", "s", ours, theirs, higher_is_better=False)
    encoder_ours, encoder_peer = ours, theirs  # 30 s

    ids = torch.randint(0, 151643, (1, PROMPT_TOKENS))
    decoder.setup_cache(1, PROMPT_TOKENS)
    # As in generation: the KV cache filled and the last position's logits (HF generate asks logits_to_keep=1).
    prefill_ours = timed(lambda: decoder(ids, torch.arange(PROMPT_TOKENS), last_only=True), args.repeats)
    prefill_peer = timed(lambda: peer(ids, use_cache=True, logits_to_keep=1), args.repeats)
    row("prefill 30 s prompt", "tok/s", PROMPT_TOKENS / prefill_ours, PROMPT_TOKENS / prefill_peer, True)

    for batch in (1, 8):
        prompt = ids.expand(batch, -1)
        decoder.setup_cache(batch, PROMPT_TOKENS + args.decode_steps + 1)
        decoder(prompt, torch.arange(PROMPT_TOKENS), last_only=True)
        next_ids = torch.randint(0, 151643, (batch, 1))

        def ours_steps():
            for t in range(args.decode_steps):
                decoder(next_ids, torch.tensor([PROMPT_TOKENS + t]))

        cache = peer(prompt, use_cache=True, logits_to_keep=1).past_key_values

        def peer_steps():
            past = DynamicCache()
            for layer, (k, v) in enumerate(zip(cache.key_cache, cache.value_cache) if hasattr(cache, "key_cache")
                                           else [(c.keys, c.values) for c in cache.layers]):
                past.update(k.clone(), v.clone(), layer)
            for _ in range(args.decode_steps):
                past = peer(next_ids, past_key_values=past, use_cache=True).past_key_values

        ours = timed(ours_steps, args.repeats) / args.decode_steps
        theirs = timed(peer_steps, args.repeats) / args.decode_steps
        row(f"decode batch {batch}", "tok/s", batch / ours, batch / theirs, True)
        if batch == 1:
            step_ours, step_peer = ours, theirs

    quantize_int8(decoder)  # ours again with int8 weights (the peer keeps the fp32 tensors)
    decoder.setup_cache(1, PROMPT_TOKENS + args.decode_steps + 1)
    prefill_int8 = timed(lambda: decoder(ids, torch.arange(PROMPT_TOKENS), last_only=True), args.repeats)
    row("prefill, ours int8", "tok/s", PROMPT_TOKENS / prefill_int8, PROMPT_TOKENS / prefill_peer, True)
    next_id = torch.randint(0, 151643, (1, 1))
    step_int8 = timed(lambda: [decoder(next_id, torch.tensor([PROMPT_TOKENS + t])) for t in range(args.decode_steps)],
                      args.repeats) / args.decode_steps
    row("decode batch 1, ours int8", "tok/s", 1 / step_int8, 1 / step_peer, True)

    ttft_ours, ttft_peer = encoder_ours + prefill_ours, encoder_peer + prefill_peer
    row("time to first token (30 s)", "s", ttft_ours, ttft_peer, higher_is_better=False)
    rtf_ours = (ttft_ours + 32 * step_ours) / 30
    rtf_peer = (ttft_peer + 32 * step_peer) / 30
    row("real-time factor (32 tok)", "x", rtf_ours, rtf_peer, higher_is_better=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"{'peak memory (process)':<28} {'GiB':<9} {peak:>12.2f}   (both implementations, shared weights)")
    rows.append({"benchmark": "peak memory (process)", "unit": "GiB", "qwenaudio+transformers": peak})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decoder-layers", type=int, default=2, help="of 32 in the real model")
    parser.add_argument("--encoder-layers", type=int, default=2, help="of 32 in the real model")
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decoding steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows and the setup here")
    args = parser.parse_args()
    setup = {"machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "dtype": "float32", "decoder_layers": args.decoder_layers,
             "encoder_layers": args.encoder_layers, "dims": "full width, random weights"}
    print(f"# {setup}")
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
