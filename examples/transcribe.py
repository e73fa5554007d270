"""Transcribe audio files with Qwen-Audio: python examples/transcribe.py FILE... [--model DIR] [--language en]"""

import argparse

import qwenaudio
from qwenaudio import tasks

parser = argparse.ArgumentParser(description="Transcribe audio files with Qwen-Audio.")
parser.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, mp3; any rate; at most 30 s are heard)")
parser.add_argument("--model", default="Qwen/Qwen-Audio", help="checkpoint directory or Hugging Face repo id")
parser.add_argument("--language", default="en", help="en zh de es ko fr ja it")
parser.add_argument("--timestamps", action="store_true", help="time every word")
parser.add_argument("--max-new-tokens", type=int, default=256)
args = parser.parse_args()

try:
    # bf16 where the hardware runs it fast (GPUs, AVX-512 CPUs), else fp32; a repo id comes from the HF cache
    # (downloaded there once)
    model = qwenaudio.load(args.model)
except qwenaudio.QwenAudioError as e:  # no weights yet: the message says how to get them
    raise SystemExit(f"error: {e}")
results = tasks.transcribe(model, args.files, language=args.language, timestamps=args.timestamps,
                           max_new_tokens=args.max_new_tokens)  # one left-padded batch, greedy
for path, result in zip(args.files, results):
    if args.timestamps:
        result = " ".join(f"[{w.start:.2f}-{w.end:.2f}] {w.text}" for w in result)
    print(f"{path}: {result}")
