"""The full-size model on this machine: load the 16.8 GB checkpoint, transcribe a 30 s clip, report time and memory.

    python benchmarks/full_model.py [--family qwen2-audio] [--weights DIR] [--modes bf16 int8 int4] [--new-tokens 32]
                                    [--json out.json]

The real weights cannot be downloaded here, so the first run writes random weights with the official dimensions
and layout (`make_tiny_checkpoint` with every dimension set to Qwen-Audio's: 8.4 B parameters, 9 bf16 shards,
about 17 GB and a few minutes) into DIR, default `weights/random-full-size`. With `--family qwen2-audio` they are
Qwen2-Audio-7B's (`make_tiny_qwen2_checkpoint` at the published config's widths: 8.4 B parameters in the published
layout, 16.8 GB), default DIR `weights/random-full-size-qwen2-audio`; a DIR that exists is read as it is, of
whichever family its config.json names. Each mode then runs in a fresh process,
so the peak resident set size it reports is its own:
- bf16: the tensors stay as stored, used in place through safetensors' memory map (no second copy); bf16 compute;
- int8: the decoder's linears quantized as each tensor is read (`qwenaudio.load(quantize="int8")`); bf16 activations;
- int4: the same in int4, groups of 64 (`qwenaudio.load(quantize="int4")`); a DIR written by `qwenaudio quantize --bits 4`
  loads pre-quantized in either int mode's place;
- fp32: everything converted to fp32 (34 GB: does not fit a 24 GB machine; for larger ones).
The clip is the first 30 s of ../shared/audio/music.wav (noise when that folder is absent). Random weights never
emit the end token, so generation runs exactly --new-tokens greedy steps. Rows: load, encoder, prefill (the ASR
prompt: Qwen-Audio's tags, 758 tokens; Qwen2-Audio's instruction, 764 with Qwen's vocabulary), time to first token
(encoder + prefill), decode tokens/s, total, real-time factor, peak RSS. The clip is transcribed twice: the first
run also pages the memory-mapped weights in (its total is reported as first_total_s), the stage columns are the
second run's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from json_output import json_path, write_json  # a sibling: --json checked first, written atomically

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT.parent / "shared" / "audio" / "music.wav"
SECONDS = 30
# Qwen2-Audio-7B's ASR prompt: the clip, then the instruction of the official evaluation's rows (eval_audio)
QWEN2_ASR = "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"
WEIGHTS = {"qwen-audio": "random-full-size", "qwen2-audio": "random-full-size-qwen2-audio"}  # --weights' default
MODES = {"bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"), "int4": (torch.bfloat16, "int4"),
         "fp32": (torch.float32, None)}


def write_weights(directory: Path, draw_on: str | None = None, family: str = "qwen-audio") -> None:
    """Random full-size weights of `family` ("qwen-audio" or "qwen2-audio") in the official layout (the official
    config, 2 GB shards), drawn by numpy or, with `draw_on`, by torch on that device (a GPU draws them in seconds;
    see make_tiny_checkpoint)."""
    from qwenaudio.testing import OFFICIAL_CONFIG, make_tiny_checkpoint

    start = time.perf_counter()
    if family == "qwen2-audio":
        _write_qwen2_weights(directory, draw_on)
    else:
        dims = {k: OFFICIAL_CONFIG[k] for k in ("hidden_size", "num_attention_heads", "kv_channels",
                                                 "num_hidden_layers", "intermediate_size")}
        dims |= {k: OFFICIAL_CONFIG["audio"][k] for k in ("n_state", "n_head", "n_layer")}
        make_tiny_checkpoint(directory, max_shard_bytes=2 * 1000**3, draw_on=draw_on, **dims)
    print(f"wrote random full-size weights to {directory} in {time.perf_counter() - start:.0f} s", flush=True)


def _write_qwen2_weights(directory: Path, draw_on: str | None) -> None:
    """Qwen2-Audio-7B's: the published config.json names few widths (transformers' defaults fill in the rest), so
    they are read from it as our config reads it. With Qwen's vocabulary where the dashscope wheel ships it (as
    the tests'), so that the ASR instruction is the 12 tokens the real tokenizer makes of it."""
    from qwenaudio.core.qwen2_audio import Qwen2AudioConfig
    from qwenaudio.testing import OFFICIAL_QWEN2_CONFIG, make_tiny_qwen2_checkpoint

    official = Qwen2AudioConfig.from_dict(OFFICIAL_QWEN2_CONFIG)
    dims = {k: getattr(official, k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                              "num_hidden_layers", "intermediate_size")}
    dims |= {k: getattr(official.audio, k) for k in ("d_model", "encoder_attention_heads", "encoder_layers",
                                                     "encoder_ffn_dim")}
    dashscope = importlib.util.find_spec("dashscope")
    vocabulary = Path(dashscope.origin).parent / "resources" / "qwen.tiktoken" if dashscope else None
    make_tiny_qwen2_checkpoint(directory, vocab_file=vocabulary if vocabulary and vocabulary.is_file() else None,
                               max_shard_bytes=2 * 1000**3, draw_on=draw_on, **dims)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def measure(weights: Path, mode: str, new_tokens: int) -> dict:
    """One mode, in this process: load, then transcribe the clip step by step with timings."""
    import qwenaudio
    from qwenaudio.core.audio import load_audio
    from qwenaudio.core.families import QWEN2_AUDIO
    from qwenaudio.core.model import prompt_batch
    from qwenaudio.prompts import asr

    dtype, quantized = MODES[mode]
    start = time.perf_counter()
    model = qwenaudio.load(weights, device="cpu", dtype=dtype, quantize=quantized,
                           progress=False)
    loaded = time.perf_counter()
    rss_loaded = peak_rss_gib()

    clip = load_audio(CLIP)[: SECONDS * 16000] if CLIP.exists() else 0.1 * torch.randn(SECONDS * 16000)
    text = QWEN2_ASR if model.family is QWEN2_AUDIO else asr("en").text("clip")
    batch = prompt_batch(model.tokenizer, [text], [[clip]], model.encoder.span_length)
    config = model.generation_config.replace(do_sample=False, max_new_tokens=new_tokens)
    runs = [_transcribe(model, clip, batch, config) for _ in range(2)]
    return {"mode": mode, "family": model.family.name, "prompt_tokens": batch.input_ids.shape[1],
            "load_s": loaded - start, "rss_after_load_gib": rss_loaded, "first": runs[0], **runs[1],
            "peak_rss_gib": peak_rss_gib()}


@torch.no_grad()
def _transcribe(model, clip: torch.Tensor, batch, config) -> dict:
    """Encode the clip and generate greedily (random weights: noise, so no text is kept), timing each stage."""
    from qwenaudio.core.generate import generate_steps

    t0 = time.perf_counter()
    spans = model.encode_audio([clip])
    t1 = time.perf_counter()
    times = [time.perf_counter() for _ in generate_steps(model.decoder, model.tokenizer, batch.input_ids,
                                                         audio=spans, config=config)]
    total = times[-1] - t0
    return {"encoder_s": t1 - t0, "prefill_s": times[0] - t1, "ttft_s": times[0] - t0,
            "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]), "new_tokens": len(times), "total_s": total,
            "rtf": total / SECONDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=WEIGHTS, default="qwen-audio",
                        help="which model's random weights to write when --weights does not exist")
    parser.add_argument("--weights", type=Path, help="default: weights/random-full-size[-qwen2-audio]")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["bf16", "int8"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=json_path, help="also write the rows and the setup here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one mode in this process
    args = parser.parse_args()
    weights = args.weights or ROOT / "weights" / WEIGHTS[args.family]
    if args.child:
        print(json.dumps(measure(weights, args.child, args.new_tokens)))
        return

    if not (weights / "model.safetensors.index.json").exists():
        write_weights(weights, family=args.family)
    setup = {"machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "memory_gib": _memory_gib(), "weights": "random, full size"}
    print(f"# {setup}")
    columns = ["load_s", "first_total_s", "encoder_s", "prefill_s", "ttft_s", "decode_tok_s", "total_s", "rtf",
               "peak_rss_gib"]
    print(f"{'mode':<6}" + "".join(f"{c:>14}" for c in columns), flush=True)
    rows = []
    for mode in args.modes:
        done = subprocess.run([sys.executable, __file__, "--child", mode, "--weights", str(weights),
                               "--new-tokens", str(args.new_tokens)], capture_output=True, text=True)
        if done.returncode:
            print(f"{mode:<6} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}", flush=True)
            rows.append({"mode": mode, "failed": done.returncode})
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["first_total_s"] = row["first"]["total_s"]
        rows.append(row)
        print(f"{mode:<6}" + "".join(f"{row[c]:>14.2f}" for c in columns), flush=True)
    if args.json:
        write_json(args.json, {"setup": setup, "rows": rows})


def _memory_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 1024**2


if __name__ == "__main__":
    main()
