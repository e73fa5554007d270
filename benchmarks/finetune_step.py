"""One LoRA fine-tuning step of the full-size model on this machine: time and peak memory.

    python benchmarks/finetune_step.py --weights DIR [--rank 8] [--new-tokens 64] [--steps 2] [--batch-size 1]
                                       [--device cuda] [--bf16-base] [--json out.json]

DIR is a full-size checkpoint (benchmarks/full_model.py writes random weights in the official layout). The model
loads with its decoder in int8 (or, with --bf16-base, all of it in bf16) and a rank-R LoRA adapter on every decoder
linear (the adapter in fp32, the forward in bf16, activation checkpointing on), then trains on --batch-size copies
of one example: the first 30 s of ../shared/audio/music.wav, or of noise where that is absent (758 prompt tokens),
with a response of --new-tokens tokens. Reported: load time, seconds per step (the first step separately: it pages
in weights), examples/s of the later steps, the process's peak resident set size and, on a GPU, its peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch
from json_output import json_path, write_json  # a sibling: --json checked first, written atomically
from recordings import recording  # a sibling: noise where ../shared is absent, as on a lent GPU

ROOT = Path(__file__).resolve().parents[1]
MUSIC = ROOT.parent / "shared" / "audio" / "music.wav"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16-base", action="store_true", help="the base in bf16 instead of int8")
    parser.add_argument("--json", type=json_path, help="also write the results here")
    args = parser.parse_args()

    import qwenaudio
    from qwenaudio import finetune
    from qwenaudio.lora import LoraConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        audio, rate, _ = recording(MUSIC, 30)
        sf.write(tmp / "clip.wav", audio, rate)
        start = time.perf_counter()
        model = qwenaudio.load(args.weights, dtype=torch.bfloat16, quantize=None if args.bf16_base else "int8", device=args.device,
                               progress=False)
        load_s = time.perf_counter() - start
        words = " ".join(["la"] * 4 * args.new_tokens)
        response = model.tokenizer.decode(model.tokenizer.encode(words)[: args.new_tokens - 1])  # + <|endoftext|>
        row = {"audio": "clip.wav", "prompt": "<|startoftranscript|><|en|><|transcribe|><|en|><|notimestamps|>"
               "<|wo_itn|>", "response": response}
        (tmp / "train.jsonl").write_text((json.dumps(row) + "\n") * args.batch_size)
        examples, bad = finetune.read_examples(tmp / "train.jsonl")
        assert not bad, bad
        seconds = []
        config = finetune.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-4, precision="bf16",
                                      lora=LoraConfig(rank=args.rank))
        finetune.train(model, examples, tmp / "run", config,
                       progress=lambda r: seconds.append(r["seconds"] - sum(seconds)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    later = seconds[1:] or seconds
    result = {"load_s": load_s, "step_s": seconds, "examples_per_s": args.batch_size * len(later) / sum(later),
              "peak_rss_gib": peak, "rank": args.rank, "new_tokens": args.new_tokens, "prompt_tokens": 758,
              "batch_size": args.batch_size, "base": "bf16" if args.bf16_base else "int8", "device": args.device,
              "threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        result |= {"gpu": torch.cuda.get_device_name(), "peak_gpu_gib": torch.cuda.max_memory_allocated() / 1024**3}
    print(f"load {load_s:.1f} s; steps {', '.join(f'{s:.1f} s' for s in seconds)}; "
          f"{result['examples_per_s']:.3g} examples/s; peak RSS {peak:.2f} GiB"
          + (f"; peak GPU memory {result['peak_gpu_gib']:.2f} GiB" if "gpu" in result else ""))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
