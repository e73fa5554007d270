"""Speed of qwenaudio against its closest maintained peer, on the same weights in the same process.

    python benchmarks/bench.py [--family qwen2-audio] [--dtypes float32 bfloat16] [--decoder-layers 2]
                               [--encoder-layers 2] [--device cuda] [--compiled-batches 1 8] [--json out.json]

For Qwen-Audio (`--family qwen-audio`, the default) the peer is transformers' Qwen2-Audio encoder and Qwen2 decoder
(`Qwen2AudioEncoder`, `Qwen2ForCausalLM`) with our tensors loaded into them (q/k/v split out of c_attn; up = w1,
gate = w2, down = c_proj); below seq_length their math is Qwen-Audio's (tests/test_encoder.py and test_decoder.py
check it). Both sides share the embedding and lm_head tensors, so the full-width model fits in memory twice.

For Qwen2-Audio (`--family qwen2-audio`) the peer is the model itself, transformers'
`Qwen2AudioForConditionalGeneration`. The weights are random ones in the published layout
(`make_tiny_qwen2_checkpoint` at the published widths, drawn on the device) in a temporary folder: ours loads them
as a user's load (`load_encoder`, `load_decoder`), and the peer takes the same tensors (nothing is copied). The rows
are the same, with v2's 30 s prompt: `<|audio_bos|>`, 750 audio positions, `<|audio_eos|>` and the ASR instruction
(`Detect the language and recognize the speech: <|en|>`, 12 tokens), 764 tokens. The peer runs as HF generate runs
it, which differs from ours in two places: its forward has no `logits_to_keep`, so its prefill computes the lm_head
for every prompt position (ours for the last only), and its encoder runs all 3,000 frames of a clip with the padded
ones masked (ours only the clip's own).

Dimensions are full size (hidden 4096, encoder 1280, vocabulary 155,947; Qwen2-Audio's 156,032) with random weights
and fewer layers, so a CPU finishes in minutes; the layer counts are printed with the results. Each figure is the
median of `--repeats` timed runs after one warm-up. For each dtype in `--dtypes`, both sides in that dtype:
- encoder: log-mel to projected features, for 5 s and 30 s of audio;
- prefill: the prompt of a 30 s ASR request (752 audio positions + 6 tags = 758 tokens; Qwen2-Audio's 764), tokens
  per second, as generation runs it on both sides (KV cache filled; logits of the last position only, but see
  Qwen2-Audio's peer above);
- decode: one token per step after that prompt, batch 1 and 8, tokens per second: ours is `decode_one_token` on
  the static KV cache (what generation runs), eager and then compiled (`compile_decoding`, torch.compile fullgraph;
  the first compiled run, which compiles, is timed on its own row); the peer is a forward with its DynamicCache, as
  HF generate runs it;
- time to first token: encoder + prefill for the 30 s request; real-time factor: that plus 32 decoded tokens, / 30 s.
Then, when bfloat16 is among the dtypes, ours with the decoder's linears in int8 and in int4 (bf16 activations)
against the peer in bf16, and against the peer's fp32 figures when float32 ran too. Decoding one token reads every
decoder weight once, so each decode batch-1 row also reports that traffic in GB/s and as a share of the device's
stream bandwidth, measured in the same run (a copy of 1 GiB), beside the same figure for one-row products through
one layer alone (the first MLP projection, w1 / gate_proj, over 1 GiB of copies of it): how far the kernel that the
step spends its time in gets. Last, the peak memory: the process's resident set on a CPU, the GPU's allocated memory
on CUDA (where decoding is compiled with CUDA graphs, mode="reduce-overhead").
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration, Qwen2Config,
                          Qwen2ForCausalLM)
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from qwenaudio import QwenAudioConfig
from qwenaudio.core.audio import feature_frames, log_mel_spectrogram
from qwenaudio.core.decoder import Decoder, KVCache
from qwenaudio.core.encoder import AudioEncoder
from qwenaudio.core.generate import Session, compile_decoding, decode_one_token, prefill
from qwenaudio.core.int4 import quantize_int4
from qwenaudio.core.int8 import quantize_int8
from qwenaudio.core.model import load_decoder, load_encoder
from qwenaudio.core.qwen2_audio import Qwen2AudioConfig
from qwenaudio.testing import OFFICIAL_QWEN2_CONFIG, make_tiny_qwen2_checkpoint, tiny_config
from json_output import json_path, write_json  # a sibling: --json checked first, written atomically

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests' name mapping
from tests.peers import qwen2_audio_encoder_weights, qwen2_decoder_weights  # noqa: E402

CUDA_GRAPHS: dict = {}  # compile_decoding's options: mode="reduce-overhead" on CUDA
SHORT = {"float32": "fp32", "bfloat16": "bf16"}


DEVICE = torch.device("cpu")  # --device


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up (on a GPU, until its queued work is done)."""
    fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stream_bandwidth() -> float:
    """GB/s of the device copying 1 GiB (read plus write), the ceiling a weight-streaming decode step can reach."""
    source = torch.empty(2**28, dtype=torch.float32, device=DEVICE).fill_(1.0)
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / timed(lambda: target.copy_(source), 5) / 1e9


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (an int4 layer's after its first product, which packs them)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def weight_bytes(decoder: Decoder) -> int:
    """Bytes a decoding step reads: the decoder's but the embedding table's (one row a token); the KV cache is no
    module buffer."""
    return tensor_bytes(decoder) - tensor_bytes(decoder.embedding)


@dataclass(frozen=True)
class Sides:
    """One dtype's models, ours and the peer on the same tensors, with the peer's calls that the rows time."""

    encoder: torch.nn.Module
    decoder: Decoder
    peer_encode: Callable[[torch.Tensor, int], torch.Tensor]  # log-mel [1, n_mels, 3000], the clip's samples
    peer_step: Callable[[torch.Tensor, object], object]  # ids [B, S], its cache (None: a prompt) -> the cache after


FULL_WIDTH = {"hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128, "intermediate_size": 22016,
              "n_state": 1280, "n_head": 20}


def build(dtype: torch.dtype, decoder_layers: int, encoder_layers: int, full_width: bool = True):
    """Our encoder and decoder with random weights (full width, or the tiny test model's for a smoke run), and the
    peer modules sharing those tensors."""
    config = QwenAudioConfig.from_dict(tiny_config(**(FULL_WIDTH if full_width else {}),
                                                   num_hidden_layers=decoder_layers, n_layer=encoder_layers))
    a = config.audio
    torch.manual_seed(0)
    with torch.device("meta"):
        encoder, decoder = AudioEncoder(config.audio), Decoder(config)
    for module in (encoder, decoder):
        module.to_empty(device=DEVICE).to(dtype).eval()
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
    encoder.positional_embedding.normal_()

    heads = config.num_attention_heads
    with torch.device(DEVICE):  # made where they run: a full-size peer initialised on the host takes minutes
        peer_encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(
            num_mel_bins=80, encoder_layers=encoder_layers, encoder_attention_heads=a.n_head,
            encoder_ffn_dim=4 * a.n_state, d_model=a.n_state, max_source_positions=1500)).to(dtype).eval()
        peer = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.mlp_width,
            num_hidden_layers=decoder_layers, num_attention_heads=heads, num_key_value_heads=heads, rms_norm_eps=1e-6,
            rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
            attn_implementation="sdpa")).to(dtype).eval()
    peer_encoder.load_state_dict(qwen2_audio_encoder_weights(encoder.state_dict()), strict=True, assign=True)
    peer.load_state_dict(qwen2_decoder_weights(decoder.state_dict()), strict=True, assign=True)
    if DEVICE.type == "cuda":  # the peak reported is the running one, not the peers' fp32 initialisation
        torch.cuda.reset_peak_memory_stats()
    return encoder, decoder, peer_encoder, peer


def qwen_audio(dtype: torch.dtype, args, weights: Path | None) -> Sides:
    """Qwen-Audio's sides (`build`): the peer's encoder needs 30 s, and its decoder keeps the last logits only."""
    encoder, decoder, peer_encoder, peer = build(dtype, args.decoder_layers, args.encoder_layers, not args.tiny)
    return Sides(encoder, decoder, lambda mel, samples: encoder.proj(peer_encoder(mel).last_hidden_state),
                 lambda ids, past: peer(ids, past_key_values=past, use_cache=True, logits_to_keep=1).past_key_values)


QWEN2_WIDTHS = {"text": ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"),
                "audio": ("d_model", "encoder_attention_heads", "encoder_ffn_dim")}


def qwen2_checkpoint(folder: Path, args) -> Path:
    """Random Qwen2-Audio weights in the published layout, at the published widths (or the tiny test model's) with
    the layers asked for, drawn on the device (a GPU draws a full-size model in seconds)."""
    official = Qwen2AudioConfig.from_dict(OFFICIAL_QWEN2_CONFIG)  # transformers' defaults fill in the widths
    widths = {} if args.tiny else {**{k: getattr(official, k) for k in QWEN2_WIDTHS["text"]},
                                   **{k: getattr(official.audio, k) for k in QWEN2_WIDTHS["audio"]}}
    start = time.perf_counter()
    path = make_tiny_qwen2_checkpoint(folder / "weights", draw_on=DEVICE.type, max_shard_bytes=2 * 1000**3,
                                      num_hidden_layers=args.decoder_layers, encoder_layers=args.encoder_layers,
                                      **widths)
    print(f"# wrote random Qwen2-Audio weights in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def qwen2_audio(dtype: torch.dtype, args, weights: Path) -> Sides:
    """Ours loaded from `weights`, and transformers' `Qwen2AudioForConditionalGeneration` on the same tensors,
    called as its generate calls it."""
    encoder = load_encoder(weights, dtype=dtype, device=DEVICE)
    decoder = load_decoder(weights, dtype=dtype, device=DEVICE)
    if DEVICE.type == "cpu":  # bf16 loads as views of the files' memory map: copied out, as Qwen-Audio's are made
        for p in itertools.chain(encoder.parameters(), decoder.parameters()):
            p.data = p.data.clone()
    peer = qwen2_peer(weights, encoder, decoder)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tower, projector = peer.model.audio_tower, peer.model.multi_modal_projector
    cache = "cache" if "cache" in inspect.signature(peer.forward).parameters else "past_key_values"  # older name

    def encode(mel: torch.Tensor, samples: int) -> torch.Tensor:
        """The audio half of its forward: all 1,500 positions, those past the clip hidden as keys."""
        frames, tokens = tower._get_feat_extract_output_lengths(torch.tensor([feature_frames(samples)], device=DEVICE))
        keys = torch.arange(tower.config.max_source_positions, device=DEVICE)[None] < frames[:, None]
        mask = create_bidirectional_mask(config=tower.config, inputs_embeds=mel.new_zeros(1, keys.shape[1], 1),
                                         attention_mask=keys.long())
        return projector(tower(mel, attention_mask=mask).last_hidden_state)[:, : int(tokens[0])]

    def step(ids: torch.Tensor, past) -> object:
        out = peer(input_ids=ids, use_cache=True, **{cache: past})
        return out.cache if hasattr(out, "cache") else out.past_key_values

    return Sides(encoder, decoder, encode, step)


def qwen2_peer(weights: Path, encoder: torch.nn.Module, decoder: Decoder) -> Qwen2AudioForConditionalGeneration:
    """transformers' model of `weights`' config holding our modules' tensors: built on the meta device (no memory,
    no initialisation), then given the tensors; the rotary frequencies, a buffer no checkpoint holds, made anew."""
    config = AutoConfig.from_pretrained(weights, attn_implementation="sdpa")
    with torch.device("meta"):
        peer = Qwen2AudioForConditionalGeneration(config)
    ours = {f"model.{name}": t for name, t in encoder.state_dict().items()}
    ours |= {name if name == "lm_head.weight" else f"model.language_model.{name.removeprefix('model.')}": t
             for name, t in decoder.state_dict().items()}
    peer.load_state_dict(ours, strict=True, assign=True)
    text = peer.model.language_model
    with torch.device(DEVICE):
        text.rotary_emb = type(text.rotary_emb)(config=config.text_config)
    missing = [n for n, t in itertools.chain(peer.named_parameters(), peer.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"the peer's {missing} took no tensor")
    return peer.eval()


@dataclass(frozen=True)
class Family:
    prompt_tokens: int  # the 30 s ASR prompt
    widest: str  # a block's first MLP projection, the widest product
    build: Callable[[torch.dtype, argparse.Namespace, Path | None], Sides]


FAMILIES = {
    "qwen-audio": Family(758, "mlp.w1", qwen_audio),  # a 30 s clip (span 752) + the 6 ASR tags
    # <|audio_bos|>, the clip's 750 positions, <|audio_eos|>, "Detect the language and recognize the speech: <|en|>"
    "qwen2-audio": Family(764, "mlp.gate_proj", qwen2_audio),
}


class Table:
    """Rows printed as they come and kept for JSON."""

    def __init__(self, stream: float) -> None:
        self.rows: list[dict] = []
        self.stream = stream  # GB/s
        print(f"{'benchmark':<32} {'dtype':<11} {'unit':<6} {'qwenaudio':>10} {'transformers':>13} {'speedup':>8}")

    def add(self, name: str, dtype: str, unit: str, ours: float, theirs: float, higher_is_better: bool) -> None:
        ratio = ours / theirs if higher_is_better else theirs / ours  # > 1: qwenaudio is faster
        self.rows.append({"benchmark": name, "dtype": dtype, "unit": unit, "qwenaudio": ours, "transformers": theirs,
                          "speedup": ratio})
        print(f"{name:<32} {dtype:<11} {unit:<6} {ours:>10.3f} {theirs:>13.3f} {ratio:>7.2f}x", flush=True)

    def own(self, name: str, dtype: str, unit: str, ours: float) -> None:
        """A figure of ours alone."""
        self.rows.append({"benchmark": name, "dtype": dtype, "unit": unit, "qwenaudio": ours})
        print(f"{name:<32} {dtype:<11} {unit:<6} {ours:>10.3f}", flush=True)

    def traffic(self, name: str, dtype: str, bytes_per_second: float) -> None:
        """Weights read per second by our decoding step (or one layer's product alone), against the device's stream
        bandwidth."""
        rate = bytes_per_second / 1e9
        self.rows.append({"benchmark": name, "dtype": dtype, "unit": "GB/s", "qwenaudio": rate,
                          "stream_share": rate / self.stream})
        print(f"{name:<32} {dtype:<11} {'GB/s':<6} {rate:>10.1f} {'':>13} {rate / self.stream:>7.0%} of stream",
              flush=True)


def peer_decode(peer_step, prompt: torch.Tensor, next_ids: torch.Tensor, steps: int):
    """A function running `steps` peer decoding steps from a copy of the prompt's DynamicCache."""
    cache = peer_step(prompt, None)
    layers = [(c.keys, c.values) for c in cache.layers] if hasattr(cache, "layers") else \
        list(zip(cache.key_cache, cache.value_cache))

    def run():
        past = DynamicCache()
        for layer, (k, v) in enumerate(layers):
            past.update(k.clone(), v.clone(), layer)
        for _ in range(steps):
            past = peer_step(next_ids, past)

    return run


def our_decode(decoder: Decoder, prompt: torch.Tensor, next_ids: torch.Tensor, steps: int, step=decode_one_token):
    """A function running `steps` of our decoding steps (`step`: decode_one_token, or it compiled) after
    prefilling `prompt`."""
    length = prompt.shape[1]
    session = Session(KVCache(decoder.config, prompt.shape[0], length + steps + 1, decoder.embedding.weight.dtype,
                              DEVICE))
    prefill(decoder, session, prompt)
    slots = [torch.tensor([length + t], device=DEVICE) for t in range(steps)]

    def run():
        for slot in slots:
            step(decoder, session.cache, next_ids, slot, session.rope_base)

    return run


def decode_seconds(table: Table, dtype: str, decoder: Decoder, ids: torch.Tensor,
                   args) -> dict[tuple[int, bool], float]:
    """Seconds per decoding step for batch 1 and 8, eager and compiled (the batches in --compiled-batches), keyed
    (batch, compiled); the first compiled run, which compiles (and on CUDA records the graph), is a row of its own."""
    seconds = {}
    for compiled in (False, True):
        step = compile_decoding(**CUDA_GRAPHS) if compiled else decode_one_token
        for batch in args.compiled_batches if compiled else (1, 8):
            prompt, next_ids = ids.expand(batch, -1), torch.randint(0, 151643, (batch, 1), device=DEVICE)
            run = our_decode(decoder, prompt, next_ids, args.decode_steps, step)
            if compiled:
                start = time.perf_counter()
                run()
                synchronize()
                table.own(f"compiling, batch {batch}", dtype, "s", time.perf_counter() - start)
            seconds[batch, compiled] = timed(run, args.repeats) / args.decode_steps
    return seconds


def kernel_alone(layer: torch.nn.Module, dtype: torch.dtype, args) -> float:
    """Bytes per second one-row products through `layer` alone read: the kernel a decoding step spends its time in
    (a block's first MLP projection, the decoder's widest shape), run over enough copies of the layer (1 GiB) that
    the weights come from memory, as in a decoding step, not from a cache. Its share of the stream bandwidth is as far
    as the decoding step can get with this kernel. --tiny, a smoke run whose figures mean nothing, copies 1 MiB:
    64 MiB were thousands of copies of a tiny layer, a third of the run."""
    x = torch.randn(1, layer.in_features, device=DEVICE, dtype=dtype)
    layer(x)  # an int4 layer packs its weight at its first product
    total = 2**20 if args.tiny else 2**30
    layers = [copy.deepcopy(layer) for _ in range(-(-total // tensor_bytes(layer)))]
    return len(layers) * tensor_bytes(layer) / timed(lambda: [c(x) for c in layers], args.repeats)


def traffic_rows(table: Table, dtype: str, decoder: Decoder, steps: dict[tuple[int, bool], float], args,
                 widest: str) -> None:
    """Each batch-1 decoding step's weight traffic, and its kernel's alone (through the block's `widest` layer)."""
    for compiled in (False, True):
        if (1, compiled) in steps:
            table.traffic(decode_label(1, compiled).replace("decode ", "weights read, "), dtype,
                          weight_bytes(decoder) / steps[1, compiled])
    table.traffic("weights read, one layer alone", dtype,
                  kernel_alone(decoder.blocks[0].get_submodule(widest), decoder.embedding.weight.dtype, args))


def decode_label(batch: int, compiled: bool) -> str:
    return f"decode batch {batch}" + (", compiled" if compiled else "")


@torch.no_grad()
def measure_dtype(table: Table, name: str, args, peer_figures: dict, weights: Path | None) -> tuple[Decoder, object]:
    """Every row for one dtype; returns our decoder and the peer's sides (kept alive for the int8 rows)."""
    dtype, short, family = getattr(torch, name), SHORT[name], FAMILIES[args.family]
    sides = family.build(dtype, args, weights)
    encoder, decoder = sides.encoder, sides.decoder
    for seconds in (5, 30):
        samples = seconds * 16000
        mel = log_mel_spectrogram(torch.randn(samples) * 0.1, encoder.n_mels)[None].to(DEVICE, dtype)
        ours = timed(lambda: encoder.encode(mel, [samples]), args.repeats)
        theirs = timed(lambda: sides.peer_encode(mel, samples), args.repeats)
        table.add(f"encoder {seconds} s", short, "s", ours, theirs, higher_is_better=False)
    encoder_ours, encoder_peer = ours, theirs  # 30 s

    tokens = family.prompt_tokens
    ids = torch.randint(0, 151643, (1, tokens), device=DEVICE)
    session = Session(KVCache(decoder.config, 1, tokens, dtype, DEVICE))
    prefill_ours = timed(lambda: prefill(decoder, session, ids), args.repeats)
    prefill_peer = timed(lambda: sides.peer_step(ids, None), args.repeats)
    table.add("prefill 30 s prompt", short, "tok/s", tokens / prefill_ours, tokens / prefill_peer, True)
    peer_figures[name] = {"prefill": tokens / prefill_peer}

    for batch in (1, 8):
        prompt, next_ids = ids.expand(batch, -1), torch.randint(0, 151643, (batch, 1), device=DEVICE)
        theirs = timed(peer_decode(sides.peer_step, prompt, next_ids, args.decode_steps), args.repeats)
        peer_figures[name][f"decode {batch}"] = batch * args.decode_steps / theirs
    steps = decode_seconds(table, short, decoder, ids, args)
    for (batch, compiled), seconds in steps.items():
        table.add(decode_label(batch, compiled), short, "tok/s", batch / seconds,
                  peer_figures[name][f"decode {batch}"], True)
    traffic_rows(table, short, decoder, steps, args, family.widest)
    step_peer = 1 / peer_figures[name]["decode 1"]
    ttft_ours, ttft_peer = encoder_ours + prefill_ours, encoder_peer + prefill_peer
    table.add("time to first token (30 s)", short, "s", ttft_ours, ttft_peer, higher_is_better=False)
    table.add("real-time factor (32 tok)", short, "x", (ttft_ours + 32 * steps.get((1, True), steps[1, False])) / 30,
              (ttft_peer + 32 * step_peer) / 30, higher_is_better=False)
    return decoder, sides


@torch.no_grad()
def measure_quantized(table: Table, decoder: Decoder, method: str, args, peer_figures: dict) -> None:
    """Ours with int8 or int4 linears (bf16 activations) against the peer's bf16 and, when measured, fp32 figures.
    `decoder` is quantized in place."""
    (quantize_int8 if method == "int8" else quantize_int4)(decoder)  # the peer keeps the bf16 tensors
    tokens = FAMILIES[args.family].prompt_tokens
    ids = torch.randint(0, 151643, (1, tokens), device=DEVICE)
    session = Session(KVCache(decoder.config, 1, tokens, decoder.embedding.weight.dtype, DEVICE))
    prefill_rate = tokens / timed(lambda: prefill(decoder, session, ids), args.repeats)
    steps = decode_seconds(table, method, decoder, ids, args)
    for peer_dtype, figures in peer_figures.items():
        short = f"{method}/{SHORT[peer_dtype]}"
        table.add("prefill 30 s prompt", short, "tok/s", prefill_rate, figures["prefill"], True)
        for (batch, compiled), seconds in steps.items():
            table.add(decode_label(batch, compiled), short, "tok/s", batch / seconds, figures[f"decode {batch}"], True)
    traffic_rows(table, method, decoder, steps, args, FAMILIES[args.family].widest)


def measure(args, table: Table, weights: Path | None) -> Table:
    """Every dtype's rows, then the quantized ones."""
    peer_figures, modules = {}, None
    for name in sorted(args.dtypes, key=lambda n: n == "bfloat16"):  # bf16 last: the quantized rows reuse it
        modules = None  # free the previous dtype's first
        modules = measure_dtype(table, name, args, peer_figures, weights)
    if "bfloat16" in args.dtypes:
        decoder, _ = modules
        bf16 = copy.deepcopy(decoder)  # int8 quantizes `decoder` in place; int4 starts from bf16 again
        figures = {k: peer_figures[k] for k in ("bfloat16", "float32") if k in peer_figures}
        measure_quantized(table, decoder, "int8", args, figures)
        measure_quantized(table, bf16, "int4", args, figures)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, default="qwen-audio")
    parser.add_argument("--dtypes", nargs="+", choices=SHORT, default=["float32", "bfloat16"])
    parser.add_argument("--decoder-layers", type=int, default=2, help="of 32 in the real model")
    parser.add_argument("--encoder-layers", type=int, default=2, help="of 32 in the real model")
    parser.add_argument("--decode-steps", type=int, default=8, help="timed decoding steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compiled-batches", type=int, nargs="*", default=[1, 8],
                        help="the decode batches also timed compiled (each compiles anew)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model's widths (a smoke run)")
    parser.add_argument("--json", type=json_path, help="also write the rows and the setup here")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        CUDA_GRAPHS["mode"] = "reduce-overhead"
    setup = {"family": args.family, "machine": platform.machine(), "processor": platform.processor(),
             "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "torch": torch.__version__, "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
             "decoder_layers": args.decoder_layers, "encoder_layers": args.encoder_layers,
             "dims": "tiny" if args.tiny else "full width, random weights", "stream_gb_s": stream_bandwidth()}
    print(f"# {setup}")
    with tempfile.TemporaryDirectory() as folder:  # Qwen2-Audio's weights, while the run lasts
        weights = qwen2_checkpoint(Path(folder), args) if args.family == "qwen2-audio" else None
        table = measure(args, Table(setup["stream_gb_s"]), weights)
    if DEVICE.type == "cuda":
        name, peak = "peak memory (GPU, allocated)", torch.cuda.max_memory_allocated() / 1024**3
    else:
        name, peak = "peak memory (process)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"{name:<32} {'':<11} {'GiB':<6} {peak:>10.2f}   (both implementations, shared weights)")
    table.rows.append({"benchmark": name, "unit": "GiB", "qwenaudio+transformers": peak})
    if args.json:
        write_json(args.json, {"setup": setup, "rows": table.rows})


if __name__ == "__main__":
    main()
