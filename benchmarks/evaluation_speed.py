"""How fast `qwenaudio evaluate` runs the benchmarks on this machine, and against the official scripts' loop.

    python benchmarks/evaluation_speed.py [--examples 16] [--full DIR] [--official-python PY --official-files DIR]
                                          [--json out.json]

Tiny part: every task on `--examples` official-format rows cycling through the recordings in ../shared/audio, on
the tiny random checkpoint (fp32, CPU, batch 8, each task's own budget of new tokens: a random model rarely stops
early, so most replies use the whole budget). Reported: examples/s and new tokens/s of `evaluation.evaluate`, from
reading the data file to writing the summary. With `--official-python` (the official venv's python) and
`--official-files`, the same rows also go through the official scripts' inner loop in that venv (tokenizer +
`model.generate` + decode, as eval_audio/evaluate_*.py run it, without torch.distributed) on the same checkpoint,
and the ratio is printed.

Full part (`--full DIR`: a full-size checkpoint, e.g. the random one benchmarks/full_model.py writes): ASR on the 5
clips (5.9, 9.0, 8.3, 4.0 and 30 s heard), in one left-padded batch by default (`--full-batch-size`), in bf16 and
int8 (`--full-modes`), with `--full-new-tokens` new tokens (random weights never emit the end token). The bf16
weights are used in place from the memory map, so its time includes reading them from disk the first time.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from json_output import json_path, write_json  # a sibling: --json checked first, written atomically

ROOT = Path(__file__).resolve().parents[1]
AUDIO = ROOT.parent / "shared" / "audio"
CLIPS = ["1272-128104-0000.flac", "1089_134686_000007_000004.wav", "es.mp3", "glass-breaking-151256.mp3",
         "music.wav"]
SOURCES = {"asr": "librispeech_test_clean", "st": "covost2_es_en_test", "srwt": "industrial_srwt",
           "caption": "clotho", "aqa": "clothoaqa", "emotion": "meld", "vocal_sound": "vocalsound",
           "scene": "cochlscene", "note_analysis": "nsynth"}


def rows(task: str, count: int) -> list[dict]:
    out = []
    for i in range(count):
        row = {"audio": str(AUDIO / CLIPS[i % len(CLIPS)]), "gt": "a reference", "source": SOURCES[task]}
        if task == "aqa":
            row["question"] = "what is it?"
        out.append(row)
    return out


def write_rows(path: Path, task: str, count: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(task, count)))
    return path


def time_ours(model, task: str, data: Path, out: Path, batch_size: int, **options) -> tuple[float, int]:
    from qwenaudio import evaluation

    start = time.perf_counter()
    evaluation.evaluate(model, task, data, out, batch_size=batch_size, **options)
    seconds = time.perf_counter() - start
    replies = [json.loads(line)["reply"] for line in (out / "examples.jsonl").read_text().splitlines()]
    tokens = sum(len(model.tokenizer.encode(r)) for r in replies)  # about the new tokens (tags re-encode as one)
    return seconds, tokens


OFFICIAL_LOOP = r"""
import json, os, sys, time, torch
sys.path.insert(0, os.path.join(sys.argv[1], "tests", "golden"))
import record_encoder
from record_evaluation import TASKS, template, format_args
work, ckpt_dir, scripts, data = sys.argv[2:6]
batch_size = int(sys.argv[6])
with record_encoder.official_workdir() as work_dir:
    from transformers import AutoTokenizer
    model = record_encoder.load_official_model(ckpt_dir, work_dir)
    tok = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=True)
    tok.padding_side, tok.pad_token_id = "left", tok.eod_id
    result = {}
    for task, (script, budget, _, _) in TASKS.items():
        prompt = template(scripts, script)
        lines = [json.loads(l) for l in open(os.path.join(data, task + ".jsonl"))]
        start = time.perf_counter()
        for i in range(0, len(lines), batch_size):
            texts = [prompt.format(*format_args(task, r)) for r in lines[i:i + batch_size]]
            info = [tok.process_audio(t) for t in texts]
            t = tok(texts, return_tensors="pt", padding="longest", audio_info=info)
            with torch.no_grad():
                out = model.generate(input_ids=t.input_ids, attention_mask=t.attention_mask, do_sample=False,
                                     max_new_tokens=budget, min_new_tokens=1, length_penalty=1.0,
                                     num_return_sequences=1, repetition_penalty=1.0, use_cache=True,
                                     pad_token_id=tok.eod_id, eos_token_id=tok.eod_id, audio_info=info)
            for row in out[:, t.input_ids.size(1):].tolist():
                pred = row[:row.index(tok.eod_id)] if tok.eod_id in row else row
                try:
                    tok.decode(pred, skip_special_tokens=False).strip()
                except KeyError:
                    pass  # an id without text: the official decode raises; the time is spent either way
        result[task] = time.perf_counter() - start
    print(json.dumps(result))
"""


def time_official(python: str, official_files: str, data_dir: Path, batch_size: int) -> dict[str, float]:
    done = subprocess.run([python, "-c", OFFICIAL_LOOP, str(ROOT), str(data_dir), official_files,
                           str(ROOT.parent / "official" / "eval_audio"), str(data_dir), str(batch_size)],
                          capture_output=True, text=True, cwd=ROOT,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags.split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--official-python", help="python of a venv with the official remote code's needs")
    parser.add_argument("--official-files", help="directory with the official e81cc26 model files")
    parser.add_argument("--full", type=Path, help="a full-size checkpoint directory")
    parser.add_argument("--full-new-tokens", type=int, default=32)
    parser.add_argument("--full-batch-size", type=int, default=5, help="5: the five clips in one left-padded batch")
    parser.add_argument("--full-modes", nargs="+", choices=("bf16", "int8"), default=["bf16", "int8"])
    parser.add_argument("--json", type=json_path, help="also write the results here")
    args = parser.parse_args()

    import qwenaudio
    from qwenaudio import evaluation
    from qwenaudio.testing import make_tiny_checkpoint

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import qwen_vocabulary  # the real vocabulary, from the dashscope wheel

    machine = {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    results = {"machine": machine, "tiny": {}, "full": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = make_tiny_checkpoint(tmp / "tiny", seed=0, vocab_file=qwen_vocabulary())
        model = qwenaudio.load(ckpt, dtype=torch.float32, device="cpu", progress=False)
        (tmp / "data").mkdir()
        for task in evaluation.BENCHMARKS:
            data = write_rows(tmp / "data" / f"{task}.jsonl", task, args.examples)
            seconds, tokens = time_ours(model, task, data, tmp / "out" / task, args.batch_size)
            results["tiny"][task] = {"examples": args.examples, "seconds": seconds,
                                     "examples_per_s": args.examples / seconds, "tokens_per_s": tokens / seconds}
        if args.official_python:
            official = time_official(args.official_python, args.official_files, tmp / "data", args.batch_size)
            for task, seconds in official.items():
                results["tiny"][task] |= {"official_seconds": seconds,
                                          "speedup": seconds / results["tiny"][task]["seconds"]}
        if args.full:
            data = write_rows(tmp / "full.jsonl", "asr", 5)
            for mode in args.full_modes:
                big = qwenaudio.load(args.full, dtype=torch.bfloat16, quantize="int8" if mode == "int8" else None, progress=False)
                seconds, _ = time_ours(big, "asr", data, tmp / f"full-{mode}", args.full_batch_size,
                                       max_new_tokens=args.full_new_tokens)
                results["full"][mode] = {"examples": 5, "batch_size": args.full_batch_size,
                                         "new_tokens": args.full_new_tokens, "seconds": seconds,
                                         "examples_per_s": 5 / seconds}
                del big

    print(f"machine: {machine}")
    print("| task | examples/s | new tokens/s | official loop s | ours s | speed-up |\n|---|---:|---:|---:|---:|---:|")
    for task, r in results["tiny"].items():
        official = f"{r['official_seconds']:.1f} | {r['seconds']:.1f} | {r['speedup']:.2f}×" if "speedup" in r \
            else f"— | {r['seconds']:.1f} | —"
        print(f"| {task} | {r['examples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {official} |")
    for mode, r in results["full"].items():
        print(f"full-size ASR, 5 clips in batches of {r['batch_size']}, {r['new_tokens']} new tokens, {mode}: "
              f"{r['seconds']:.1f} s, "
              f"{r['examples_per_s']:.3f} examples/s")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
