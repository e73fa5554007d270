"""The `qwenaudio` command: run a task on audio files in batches, chat about clips on a terminal, or record and
compare activation traces against the official model.

Results go to stdout (and, with --output-dir, one file per input); progress and errors go to stderr, so
`qwenaudio transcribe talk.wav --format srt > talk.srt` works. A file that cannot be read is reported and the others
go on. Exit codes: 0 all done, 1 some file failed (verify: some tensor is out of tolerance), 2 bad arguments or
unusable trace files, 3 the model could not be loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import evaluation, finetune, lora, tasks, trace
from .batch import (AUDIO_SUFFIXES, Job, check_names, check_outputs, check_settings, find_inputs, model_identity,
                    refuse_many_inputs, refuse_model_directory, write_record)
from .chat import DEFAULT_SYSTEM, Chat
from .core import int4
from .core.audio import SAMPLE_RATE, as_waveform
from .core.errors import AudioError, InputError, OutputError, QwenAudioError, TrainingError
from .core.files import fingerprint, refuse_inputs, writable_directory, write_text
from .core.model import QwenAudio, as_device, as_dtype, default_dtype
from .core.tokenizer import LANGUAGES
from .hub import load, looks_like_path, report_progress, resolve
from .longform import Segment, text_of, words_of
from .quantize import save_quantized
from .runner import Processes, Report, leave_process_group, process_group
from .subtitles import Word, cues, to_json, to_srt, to_vtt

TASKS = ("transcribe", "translate", *tasks.TASKS)
# quantize and merge write a checkpoint directory whole: the same rules, said once.
TARGET_HELP = "the directory to write: new or empty, never BASE / SOURCE / ADAPTER, inside or around them"
OVERWRITE_HELP = "replace the checkpoint at TARGET (only a checkpoint directory; it is kept until the new one is whole)"
WRITE_EPILOG = ("exit status: 0 written, 1 TARGET cannot be written (read-only, full disk: nothing is left there) or "
                "would replace an input, 2 bad arguments, 3 the checkpoint or adapter cannot be read")
FORMATS = ("txt", "json", "srt", "vtt")  # --format all writes each
TIMED_FORMATS = ("srt", "vtt")


# What an interrupted command says on stderr: how to go on without losing what is done.
RESUME_HINTS = {"transcribe": "rerun the same command to resume: files done are kept",
                "evaluate": "rerun the same command to resume: the replies so far are kept",
                "finetune": "rerun with --resume to continue from the last checkpoint"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `kill PID`), taken like Ctrl-C so every command saves what it has done."""


def _terminate(signum: int, _frame) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the command line), load the model, run the subcommand; returns the exit code (128 +
    the signal's number when interrupted: 130 for Ctrl-C, 143 for SIGTERM)."""
    warnings.showwarning = _warn
    try:
        args = parse(argv)
    except SystemExit as e:  # --help or a usage error: argparse has already said what to say
        return int(e.code or 0)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (a caller's worker): SIGTERM keeps its own handler
        previous = None
    try:
        return run(args)
    except KeyboardInterrupt as e:
        hint = RESUME_HINTS.get(args.command)
        if args.command == "finetune" and not (args.output_dir / "checkpoint").is_dir():  # stopped before step 1
            hint = "no checkpoint was saved yet: rerun the same command, without --resume, to start"
        print("interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
        return 128 + (e.args[0] if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        leave_process_group()


def run(args: argparse.Namespace) -> int:
    """Check what can be checked before the model loads, join torchrun's processes, load the model, run."""
    try:
        if args.command == "trace":
            plan_trace(args)
        if args.command == "verify":
            plan_verify(args)
        if args.command == "transcribe":  # inputs and the output directory are checked before the model loads
            plan_outputs(args)
        if args.command == "finetune":
            plan_finetune(args)
        if args.command == "evaluate":
            args.plan = evaluation.plan(
                args.task, args.data, args.output_dir, audio_root=args.audio_root, language=args.language,
                caption_style=args.caption_style, limit=args.limit, max_new_tokens=args.max_new_tokens,
                model_name=args.model + (" (int8)" if args.int8 else "") + (" (int4)" if args.int4 else "") +
                (f" + adapter {args.adapter.resolve()}" if args.adapter else ""), checkpoint=args.model,
                adapter=args.adapter, dtype=_dtype(args), quantization=_quantization(args), overwrite=args.overwrite)
            if os.environ.get("RANK", "0") == "0":  # every line that cannot run, before the model loads
                for problem in args.plan.problems:
                    print(f"error: {problem}", file=sys.stderr, flush=True)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputError as e:  # an output that would replace an input, or that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1
    except QwenAudioError as e:  # transcribe, evaluate: the model their outputs are keyed on cannot be found
        print(f"error: {e}", file=sys.stderr)
        return 3
    sharing = args.command in ("transcribe", "evaluate", "finetune")
    args.rank, args.world = process_group(args.device) if sharing else (0, 1)
    if args.world > 1 and not args.output_dir:
        print("error: several processes write files only: give --output-dir", file=sys.stderr)
        return 2
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.world > 1 and args.device == "cuda" else args.device
    try:
        model = args.model and load(args.model, device=device, dtype=args.dtype, quantize=_quantization(args),
                                    adapter=args.adapter, progress=args.rank == 0)
    except QwenAudioError as e:  # a missing checkpoint's message says how to get one
        print(f"error: {e}", file=sys.stderr)
        return 3
    try:
        return args.run(model, args)
    except OutputError as e:  # a full disk, a read-only directory: the run failed, the arguments were fine
        print(f"error: {e}", file=sys.stderr)
        return 1
    except QwenAudioError as e:  # e.g. a file that is not a trace, a missing clip, an unclosed <audio> tag
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a trace that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 1


def _warn(message: Warning | str, *_) -> None:
    """Library warnings (a budget cut to the context, …) as one `warning:` line, like errors."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qwenaudio", description="Qwen-Audio and Qwen-Audio-Chat in pure PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("transcribe", help="transcribe, translate, caption or classify audio files",
                              description="Run a Qwen-Audio task on audio files, a batch at a time.",
                              epilog="exit status: 0 all files done, 1 some failed (see stderr), --output-dir cannot "
                                     "be written, or an output would replace an input or a file the command did "
                                     "not write, 2 bad arguments or "
                                     "other settings than the outputs' (both found before the model loads), 3 the "
                                     "model could not be loaded, 130 interrupted, 143 on SIGTERM (summary.json still "
                                     "written)")
    run.add_argument("files", nargs="+", type=Path, metavar="FILE|DIR",
                     help="audio files (wav, flac, ogg, mp3, any length), or directories searched for them")
    run.add_argument("--task", choices=TASKS, default="transcribe", metavar="TASK",
                     help=f"{', '.join(TASKS)}; default transcribe")
    run.add_argument("--language", choices=LANGUAGES, metavar="LANG",
                     help=f"transcribe, translate: the spoken language, one of {' '.join(LANGUAGES)}; default en")
    run.add_argument("--target-language", choices=LANGUAGES, metavar="LANG",
                     help="translate: the output language; default zh")
    run.add_argument("--itn", action="store_true", help="transcribe: write numbers and symbols as written ($5)")
    run.add_argument("--timestamps", action="store_true", help="transcribe: time every word (implied by srt, vtt)")
    run.add_argument("--format", choices=(*FORMATS, "all"), default="txt",
                     help="what stdout and --output-dir get; all: every format, into --output-dir; default txt")
    run.add_argument("--output-dir", type=Path, metavar="DIR",
                     help="also write <name>.<format> per file here (and summary.json); files whose outputs exist "
                          "are skipped, so an interrupted run resumes")
    run.add_argument("--overwrite", action="store_true",
                     help="redo files whose outputs exist, with any settings, and replace files of the outputs' "
                          "names that this command did not write (never an input)")
    run.add_argument("--batch-size", type=_positive, default=4, metavar="N", help="files per forward pass; default 4")
    _model_options(run, "Qwen/Qwen-Audio", transcribe_files)
    chat = commands.add_parser("chat", help="talk with Qwen-Audio-Chat about clips",
                               description="Chat on stdin: '/audio PATH' attaches a clip to the next question, "
                                           "'/reset' forgets the conversation, '/help' lists the commands, '/quit' "
                                           "or end of input leaves; any other /word is refused, not sent (start a "
                                           "line with // to send it as text). Ctrl-C during a reply drops it.")
    chat.add_argument("--system", default=DEFAULT_SYSTEM, help="the system message")
    _model_options(chat, "Qwen/Qwen-Audio-Chat", chat_loop)
    bench = commands.add_parser("evaluate", help="run one of the paper's benchmarks as the official script does",
                                description="Run a benchmark on an official-format JSON Lines file (the converted "
                                            "files eval_audio/EVALUATION.md downloads) with the official prompt, "
                                            "decoding and scoring; replies are kept as they come, so a rerun "
                                            "into the same --output-dir resumes.",
                                epilog="exit status: 0 every example replied to and scored, 1 some failed (listed "
                                       "in summary.json), --output-dir cannot be written, or an output would "
                                       "replace an input or a file the command did not write, 2 bad arguments, data or other settings than "
                                       "run.json's (all found before the model loads), 3 the model could not be "
                                       "loaded, 130 interrupted, 143 on SIGTERM (summary still written)")
    bench.add_argument("task", choices=evaluation.TASKS, metavar="TASK", help=", ".join(evaluation.TASKS))
    bench.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl",
                       help="one example per line: audio, gt, source (and question for aqa)")
    bench.add_argument("--audio-root", type=Path, metavar="DIR",
                       help="where the rows' audio paths start; default: the current directory, as the official "
                            "scripts")
    bench.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                       help="run.json, replies/, examples.jsonl, summary.json and summary.md go here")
    bench.add_argument("--limit", type=_positive, metavar="N", help="only the first N examples")
    bench.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="examples per batch; default 8")
    bench.add_argument("--language", choices=LANGUAGES, metavar="LANG",
                       help="asr, srwt: the spoken language of rows without a 'lang' field; default: from the "
                            "source's dataset (librispeech en, aishell zh)")
    bench.add_argument("--caption-style", choices=evaluation.CAPTION_STYLES, default="clotho",
                       help="caption: the output style tag; default clotho")
    bench.add_argument("--overwrite", action="store_true",
                       help="discard the replies of an earlier run, whatever its settings, and replace files of the "
                            "outputs' names that this command did not write (never an input)")
    _model_options(bench, "Qwen/Qwen-Audio", evaluate_benchmark)
    tune = commands.add_parser("finetune", help="fine-tune Qwen-Audio or Qwen-Audio-Chat on your own examples",
                               description="Full fine-tuning with the official loss on a JSON Lines file (task form, "
                                           "chat form or ms-swift form; see README), checkpoints as it goes, the "
                                           "fine-tuned model in the official layout at the end.",
                               epilog="exit status: 0 done, 1 training stopped (a loss or weights that are not "
                                      "finite, a full disk, an unwritable --output-dir; the last checkpoint is "
                                      "kept), 2 bad arguments or data (found before the model loads), 3 the model "
                                      "could not be loaded, 130 interrupted by Ctrl-C, 143 by SIGTERM (a checkpoint "
                                      "of the last whole step is saved first: --resume continues)")
    tune.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl", help="the training examples")
    tune.add_argument("--eval-data", type=Path, metavar="FILE.jsonl",
                      help="held-out examples (same forms): eval_loss in metrics.jsonl every --eval-every steps")
    tune.add_argument("--eval-every", type=int, default=0, metavar="N",
                      help="steps between evaluations; default: with each checkpoint and at the end")
    tune.add_argument("--eval-task", choices=evaluation.TASKS, metavar="TASK",
                      help="also reply greedily to the --eval-data prompts and score them as TASK is (e.g. asr: WER)")
    tune.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                      help="checkpoint/, metrics.jsonl and, at the end, model/ (the fine-tuned checkpoint)")
    tune.add_argument("--task", choices=evaluation.TASKS, metavar="TASK",
                      help="read rows without a prompt (e.g. the official evaluation files) as this task")
    tune.add_argument("--language", choices=LANGUAGES, metavar="LANG", help="--task asr, srwt: the spoken language")
    tune.add_argument("--train", choices=finetune.PARTS, default="decoder", help="what to train; default decoder")
    tune.add_argument("--steps", type=_positive, default=100, metavar="N", help="optimizer steps; default 100")
    tune.add_argument("--batch-size", type=_positive, default=4, metavar="N", help="examples per pass; default 4")
    tune.add_argument("--accumulate", type=_positive, default=1, metavar="N", help="passes per step; default 1")
    tune.add_argument("--lr", type=float, default=1e-5, help="peak learning rate; default 1e-5")
    tune.add_argument("--warmup-steps", type=int, default=0, metavar="N", help="linear warmup; then cosine to 0")
    tune.add_argument("--weight-decay", type=float, default=0.0)
    tune.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm; 0: off")
    tune.add_argument("--seed", type=int, default=0, help="the data order")
    tune.add_argument("--save-every", type=int, default=0, metavar="N",
                      help="steps between checkpoints; 0 (default): only at the end, on Ctrl-C and by --save-minutes")
    tune.add_argument("--save-minutes", type=float, default=finetune.TrainConfig.save_minutes, metavar="M",
                      help=f"also save a checkpoint every M minutes of wall time; 0: off; default "
                           f"{finetune.TrainConfig.save_minutes:g}")
    tune.add_argument("--precision", choices=finetune.PRECISIONS, default="auto",
                      help="bf16: forward under bf16 autocast, fp32 weights and optimizer; auto (default): bf16 on "
                           "GPUs that run it, else fp32")
    tune.add_argument("--fsdp", action="store_true",
                      help="under torchrun: shard weights, gradients and optimizer state over the processes "
                           "(full fine-tuning of a model too large for one device)")
    tune.add_argument("--no-activation-checkpointing", action="store_true",
                      help="keep every block's activations (faster, much more memory)")
    tune.add_argument("--skip-bad", action="store_true",
                      help="train on the good lines and list the bad ones at the end (default: refuse the file)")
    tune.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    tune.add_argument("--lora-rank", type=int, default=0, metavar="R",
                      help="train a LoRA adapter of rank R instead of --train's weights (0: full fine-tuning)")
    tune.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA's alpha (> 0); default 2 × rank")
    tune.add_argument("--lora-dropout", type=float, metavar="P", help="dropout before A, in [0, 1); default 0")
    tune.add_argument("--lora-targets", nargs="+", metavar="NAME",
                      help=f"decoder linears to adapt; default {' '.join(lora.DECODER_TARGETS)}")
    tune.add_argument("--lora-encoder", action="store_true", help="also adapt the audio encoder's linears")
    tune.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(rank) (rank-stabilized LoRA)")
    _model_options(tune, "Qwen/Qwen-Audio", finetune_model)
    record = commands.add_parser("trace", help="record every layer's activations for one prompt",
                                 description="Run one prompt (a prefill, no generation) and write its activations "
                                             "in the format tools/record_official.py writes for the official code.",
                                 epilog="exit status: 0 written, 1 --out cannot be written or would replace an input "
                                        "(found before the model loads) or the disk is full, 2 a bad prompt or clip "
                                        "(found before the model loads), 3 the model could not be loaded")
    record.add_argument("--prompt", required=True, help="the prompt; <audio>PATH</audio> regions name the clips")
    record.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    _trace_options(record)
    _model_options(record, "Qwen/Qwen-Audio", trace_prompt)
    check = commands.add_parser("verify", help="compare two traces layer by layer",
                                description="Compare our trace with a reference trace (from tools/record_official.py); "
                                            "with one trace and --model, record ours from the reference's prompt and, "
                                            "if the reference is not projected, also run each layer on the "
                                            "reference's own input to it (the isolated column).",
                                epilog="exit status: 0 every tensor both traces hold within tolerance, 1 some "
                                       "tensor or isolated layer is not, or the reference holds a stage ours lacks "
                                       "or comes from a model of other dimensions, "
                                       "or --out cannot be written, 2 unusable trace files or nothing in common, "
                                       "3 the model could not be loaded")
    check.add_argument("traces", nargs="+", type=Path, metavar="TRACE", help="OURS REFERENCE, or REFERENCE --model")
    check.add_argument("--rtol", type=_tolerance, help="max |ours - ref| / max |ref| per tensor; default by dtype "
                                                  "(1e-5 for fp32, 5e-3 fp16, 3e-2 bf16)")
    check.add_argument("--atol", type=_tolerance, default=0.0,
                       help="a tensor also passes when max |ours - ref| <= atol")
    check.add_argument("--isolated-rtol", type=_tolerance, metavar="RTOL",
                       help="with --model: tolerance of each layer run on the reference's input, relative to what the "
                            "layer changes; default by the reference's dtype (1e-5 for fp32, 3e-2 bf16)")
    check.add_argument("--out", type=Path, help="with --model: also save our trace here")
    _model_options(check, None, verify_traces)
    shrink = commands.add_parser("quantize", help="write an int8 or int4 copy of a checkpoint",
                                 description="Copy checkpoint directory SOURCE to TARGET with the decoder's linears in "
                                             "int8 plus per-row scales (9.68 GB on disk for Qwen-Audio instead of "
                                             "16.79), or in int4 with per-group scales and zeros (6.56 GB); "
                                             "qwenaudio loads it quantized as it is.",
                                 epilog=WRITE_EPILOG)
    shrink.add_argument("source", type=Path, help="a checkpoint directory in the official layout")
    shrink.add_argument("target", type=Path, help=TARGET_HELP)
    shrink.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    shrink.add_argument("--bits", type=int, choices=(8, 4), default=8, help="8 (default) or 4")
    shrink.add_argument("--group-size", type=int, choices=int4.GROUP_SIZES,
                        help=f"--bits 4 only: inputs sharing a scale and a zero; default {int4.DEFAULT_GROUP_SIZE}, "
                             "or the largest size below it that divides every layer's inputs (a warning says so)")
    shrink.set_defaults(model=None, run=quantize_checkpoint, dtype=None, device=None, adapter=None)
    fold = commands.add_parser("merge", help="fold a LoRA adapter into its base checkpoint",
                               description="Write BASE with ADAPTER's updates added to its weights, as a checkpoint "
                                           "in the official layout that loads without the adapter. Each merged "
                                           "weight is computed in fp32 and rounded once to --dtype: stored in fp32, "
                                           "merged logits equal the unmerged model's within 1e-5 (6.0e-7 measured on "
                                           "the tiny test model); stored in the base's bf16 (the default, half the "
                                           "size), that rounding moves them by about bf16's own precision (3.1e-3 "
                                           "relative there).",
                               epilog=WRITE_EPILOG)
    fold.add_argument("base", metavar="BASE", help="the base checkpoint directory or repo id (float, not quantized)")
    fold.add_argument("adapter_dir", type=Path, metavar="ADAPTER", help="a LoRA adapter directory (peft format)")
    fold.add_argument("target", type=Path, metavar="TARGET", help=TARGET_HELP)
    fold.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="the dtype the checkpoint stores; default: the base's (bf16 for the official weights); "
                           "float32 keeps the merge exact, at twice bf16's size")
    fold.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    fold.set_defaults(model=None, run=merge_adapter, device=None, adapter=None, int8=False, int4=False)
    args = parser.parse_args(argv)
    if args.command == "verify" and len(args.traces) != (1 if args.model else 2):
        check.error("give OURS and REFERENCE traces, or one REFERENCE trace and --model")
    if args.command == "verify" and args.out and not args.model:
        check.error("--out saves the trace recorded with --model; OURS is already a file")
    if args.command == "transcribe" and (args.timestamps or args.format in (*TIMED_FORMATS, "all")):
        if args.task != "transcribe":
            run.error("word timestamps (--timestamps, --format srt, vtt or all) come only with --task transcribe")
        args.timestamps = True
    if args.command == "transcribe" and args.format == "all" and not args.output_dir:
        run.error("--format all writes files: give --output-dir")
    if args.command == "transcribe":
        ignored = [option for option, used in (
            ("--itn", not args.itn or (args.task == "transcribe" and not args.timestamps)),
            ("--language", args.language is None or args.task in ("transcribe", "translate")),
            ("--target-language", args.target_language is None or args.task == "translate")) if not used]
        if ignored:
            what = "word timestamps" if args.task == "transcribe" else f"--task {args.task}"
            run.error(f"{' and '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with {what}")
        args.language, args.target_language = args.language or "en", args.target_language or "zh"
    if args.command == "quantize" and args.group_size is not None and args.bits != 4:
        shrink.error("--group-size: only with --bits 4 (int8 has a scale per row)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def _trace_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", type=_positive, metavar="K",
                        help="project wide tensors onto K fixed random columns (keeps full-size traces small)")
    parser.add_argument("--logits", choices=("last", "all"), default="last", help="which positions' logits to keep")


def _model_options(parser: argparse.ArgumentParser, repo: str | None, run) -> None:
    parser.add_argument("--model", default=repo, metavar="DIR|REPO",
                        help=f"checkpoint directory, or a repo id looked up in $QWENAUDIO_HOME if set, else in the "
                             f"Hugging Face cache, and downloaded there when missing; default {repo or 'none'}")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 where the hardware runs it fast (GPUs, AVX-512 CPUs), else float32 "
                             "(float16 on older GPUs); verify: the reference trace's dtype")
    quantized = parser.add_mutually_exclusive_group()
    quantized.add_argument("--int8", action="store_true",
                           help="quantize the decoder's linears to int8 while loading (peak memory 10.7 GiB instead "
                                "of 15.5; on CPUs with AVX-512 also faster decoding); int8 checkpoints load in int8 "
                                "without it")
    quantized.add_argument("--int4", action="store_true",
                           help="quantize the decoder's linears to int4 (groups of 64, or 32 where 64 does not divide "
                                "a layer's inputs) while loading (peak memory 7.95 GiB instead of int8's 10.8), "
                                "inference only; int4 checkpoints (quantize --bits 4) load in int4 without it")
    parser.add_argument("--adapter", type=Path, metavar="DIR",
                        help="a LoRA adapter (qwenaudio finetune's, or peft's for Qwen-Audio) applied on load")
    parser.add_argument("--max-new-tokens", type=_positive, metavar="N", help="default: the task's own budget")
    parser.set_defaults(repo=repo, run=run)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def plan_outputs(args: argparse.Namespace) -> None:
    """Before any model loads: find the inputs (every path must exist, and some audio must be found), check the
    output directory can be written and claim the outputs there (`_claim_outputs`), and set aside the files whose
    outputs already exist (`args.jobs`, `args.todo`)."""
    args.jobs = find_inputs(args.files)
    if not args.jobs:
        raise InputError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) found in {', '.join(map(str, args.files))}")
    args.formats = FORMATS if args.format == "all" else (args.format,)
    args.todo = args.jobs
    if not args.output_dir:
        return
    check_names(args.jobs)
    writable_directory(args.output_dir)
    outputs = {job: [_output(args, job, f) for f in args.formats] for job in args.jobs}
    _claim_outputs(args, [p for paths in outputs.values() for p in paths])
    args.todo = [j for j in args.jobs if args.overwrite or not all(p.exists() for p in outputs[j])]


def _claim_outputs(args: argparse.Namespace, outputs: list[Path]) -> None:
    """Refuse an output that is an input (an audio file, the model's files) under any name, one that exists but no
    run wrote, and, where earlier outputs exist, other settings (`--overwrite` lifts the last two); then record the
    settings and claim every output in summary.json (`args.record`) before any is written, so even a killed run
    knows its own files."""
    directory, record_file = args.output_dir, args.output_dir / "summary.json"
    model_files, key = model_identity(args.model, args.adapter)
    refuse_model_directory(directory, model_files)
    refuse_inputs([record_file], [*args.files, *model_files])
    refuse_many_inputs([record_file, *outputs], [*(job.path for job in args.jobs), *model_files])
    names = [str(p.relative_to(directory)) for p in outputs]
    record, ours = check_outputs(record_file, "transcribe", names, overwrite=args.overwrite)
    settings = {"task": args.task, "language": args.language, "target_language": args.target_language,
                "itn": args.itn, "timestamps": args.timestamps, "max_new_tokens": args.max_new_tokens,
                "model": str(args.model), **key, "dtype": _dtype(args), "quantization": _quantization(args)}
    if ours:
        check_settings(record, settings, directory, overwrite=args.overwrite)
    claimed = sorted({*(record["outputs"] if record else []), *names})
    args.record = {"command": "transcribe", "settings": settings, "outputs": claimed}
    write_record(record_file, {**args.record, "files": len(args.jobs), "done": [], "skipped": [], "failed": [],
                               "interrupted": False, "finished": False})


def _dtype(args: argparse.Namespace) -> str:
    """The dtype the model will be loaded in (--dtype, else the device's default), as outputs are keyed on it."""
    return str(as_dtype(args.dtype) or default_dtype(as_device(args.device))).removeprefix("torch.")


def _quantization(args: argparse.Namespace) -> str | None:
    return "int8" if args.int8 else "int4" if args.int4 else None


def transcribe_files(model: QwenAudio, args: argparse.Namespace) -> int:
    """Inputs are batched by length and shared between processes (`qwenaudio.runner`); a file that cannot be read,
    recognised or written is reported and the others go on. Outputs are written under temporary names and renamed,
    so an output that exists is complete; stdout gets the files in input order. summary.json (rank 0) lists the
    files done, skipped and failed, also after Ctrl-C."""
    processes, jobs, todo = Processes(args.rank, args.world), args.jobs, args.todo
    printing = processes.world == 1 and args.format != "all"
    shown = InputOrder(todo if printing else [])
    documents: dict[Path, str] = {}
    progress = processes.progress("files")

    def write(job: Job, result: tuple[str, list[Word], list[Segment]]) -> None:
        for fmt in args.formats:
            document = render(fmt, job.path, *result, args.task)
            if args.output_dir:
                target = _output(args, job, fmt)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_text(target, document)
            if printing:
                documents[job.path] = _for_stdout(job, fmt, document, single=len(jobs) == 1)

    def summarize(reports: list[Report], interrupted: bool) -> None:
        if interrupted:  # what has finished is printed, in order, though earlier files have not
            shown.flush()
        planned = set(todo)
        summary = {**getattr(args, "record", {}), "files": len(jobs),
                   "done": [path for report in reports for path in report.done],
                   "skipped": [str(j.path) for j in jobs if j not in planned],
                   "failed": [line for report in reports for line in report.failed],
                   "processes": processes.world, "interrupted": interrupted, "finished": not interrupted}
        if args.output_dir:
            try:
                write_text(args.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            except OSError as e:
                print(f"error: could not write {args.output_dir / 'summary.json'}: {e}", file=sys.stderr)
        print(f"{len(summary['done'])} done, {len(summary['skipped'])} skipped (outputs exist), "
              f"{len(summary['failed'])} failed, of {len(jobs)} files" + (" (interrupted)" if interrupted else ""),
              file=sys.stderr)

    _, reports = processes.run(
        todo, lambda batch, clips: run_task(model, batch, clips, args), write, summarize,
        batch_size=args.batch_size,
        progress=lambda k, n, batch: progress.count(k, n, " ".join(str(j.path) for j in batch)),
        finished=lambda job, _: shown.finish(job, documents.pop(job.path, None)),
        different="the processes found different files to do; is the output directory shared and stable?")
    return 1 if any(report.failed for report in reports) else 0


class InputOrder:
    """Prints each file's stdout document in the order the files were given, as soon as every file before it has
    finished (batches run longest first, so results arrive in another order)."""

    def __init__(self, jobs: list[Job]):
        self.order, self.ready, self.next = [j.path for j in jobs], {}, 0

    def finish(self, job: Job, document: str | None) -> None:
        self.ready[job.path] = document
        while self.next < len(self.order) and self.order[self.next] in self.ready:
            self._print(self.ready.pop(self.order[self.next]))
            self.next += 1

    def flush(self) -> None:
        """Print what has finished, in order, though earlier files have not (the run was interrupted)."""
        for path in self.order[self.next:]:
            self._print(self.ready.pop(path, None))

    @staticmethod
    def _print(document: str | None) -> None:
        if document:
            print(document, end="", flush=True)


def run_task(model: QwenAudio, jobs: list[Job], clips: list[torch.Tensor], args: argparse.Namespace
             ) -> list[tuple[str, list[Word], list[Segment]]]:
    """(text, words, segments) per clip; words come only from timed transcription. Any length (see tasks): a long
    file reports its windows as they are done."""
    generation = {"max_new_tokens": args.max_new_tokens}  # None keeps the task's own budget
    if args.task == "transcribe":
        task = tasks.asr_task(args.language, itn=args.itn, timestamps=args.timestamps)
    elif args.task == "translate":
        task = tasks.translate_task(args.language, args.target_language)
    else:
        return [(text, [], [Segment(text, 0.0, len(c) / SAMPLE_RATE)])
                for text, c in zip(tasks.analyse(model, clips, args.task, **generation), clips)]
    who = Processes(args.rank, args.world).who

    def windows(i: int, finished: int, total: int) -> None:
        print(f"{who}{jobs[i].path}: {finished}/{total} windows", file=sys.stderr, flush=True)

    out = tasks.segments(model, clips, task, timed=args.timestamps, progress=windows, **generation)
    return [(text_of(parts), words_of(parts), parts) for parts in out]


def render(fmt: str, path: Path, text: str, words: list[Word], parts: list[Segment], task: str) -> str:
    if fmt == "json":
        segments = [{"text": s.text, "start": s.start, "end": s.end} for s in parts]
        return to_json(text, words, segments=segments, file=str(path), task=task)
    if fmt in TIMED_FORMATS:  # a reply without timestamps is one cue over its window, not an empty one
        shown = [cue for s in parts for cue in cues(s.words, s.text, s.start, s.end)]
        return to_srt(shown) if fmt == "srt" else to_vtt(shown)
    return text + "\n"


def _for_stdout(job: Job, fmt: str, document: str, single: bool) -> str:
    """What stdout shows of a file: the document alone for one file; for several, txt lines start with the path,
    json becomes one line per file (JSON Lines), srt and vtt get a `==> path <==` header (as `head` does)."""
    if single:
        return document
    if fmt == "txt":
        return f"{job.path}: {document}"
    if fmt == "json":
        return json.dumps(json.loads(document), ensure_ascii=False) + "\n"
    return f"==> {job.path} <==\n{document}"


def _output(args: argparse.Namespace, job: Job, fmt: str) -> Path:
    return args.output_dir / job.name.with_name(f"{job.name.name}.{fmt}")


DECODING_EVERY_S = 10.0  # evaluate: seconds between "decoding a batch" lines while a batch decodes


def evaluate_benchmark(model: QwenAudio, args: argparse.Namespace) -> int:
    """Run this process's share of the planned benchmark; process 0 prints the Markdown summary on stdout."""
    processes = Processes(args.rank, args.world)
    examples = processes.progress("examples")

    def progress(done: int, total: int, seconds: float) -> None:
        examples.rate(done, total, seconds)
        shown[0] = time.monotonic()

    def decoding(steps: int, budget: int) -> None:  # a batch with a large budget takes minutes: show it moves
        if time.monotonic() - shown[0] >= DECODING_EVERY_S:
            print(f"{processes.who}decoding a batch: {steps}/{budget} new tokens", file=sys.stderr, flush=True)
            shown[0] = time.monotonic()

    shown = [time.monotonic()]
    summary = evaluation.execute(model, args.plan, batch_size=args.batch_size, processes=processes,
                                 progress=progress, decoding=decoding)
    if processes.rank == 0:
        print(evaluation.markdown(summary), end="")
        print(f"wrote {args.output_dir / 'summary.json'}, summary.md and examples.jsonl", file=sys.stderr)
    return 1 if summary and not summary["complete"] else 0


# LoRA's options, which mean nothing without --lora-rank: (option, its attribute, its value when not given).
LORA_OPTIONS = (("--lora-alpha", "lora_alpha", None), ("--lora-dropout", "lora_dropout", None),
                ("--lora-targets", "lora_targets", None), ("--lora-encoder", "lora_encoder", False),
                ("--rslora", "rslora", False))


def plan_finetune(args: argparse.Namespace) -> None:
    """Before the model loads: the settings, every data line (all bad ones listed), what the run writes (never one
    of its inputs, into a directory it can write) and, with --resume, that the checkpoint's run is this one."""
    ignored = [option for option, name, unset in LORA_OPTIONS if getattr(args, name) != unset]
    if ignored and not args.lora_rank:
        raise InputError(f"{', '.join(ignored)}: LoRA's options need --lora-rank R (0, the default, is full "
                         "fine-tuning)")
    adapter = args.lora_rank and lora.LoraConfig(  # only an absent alpha defaults: 0 or -4 are refused
        rank=args.lora_rank, alpha=2 * args.lora_rank if args.lora_alpha is None else args.lora_alpha,
        dropout=args.lora_dropout or 0.0, rslora=args.rslora, encoder=args.lora_encoder,
        targets=tuple(args.lora_targets or lora.DECODER_TARGETS))
    args.config = finetune.TrainConfig(
        lora=adapter or None, steps=args.steps, batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        seed=args.seed, part=args.train, save_every=args.save_every, save_minutes=args.save_minutes,
        activation_checkpointing=not args.no_activation_checkpointing, precision=args.precision, shard=args.fsdp,
        eval_every=args.eval_every, eval_task=args.eval_task)
    if args.adapter:
        raise InputError("--adapter: an adapter's training continues with --resume in its run's --output-dir")
    try:  # the library's rule (train refuses the same), named by the option that asked for the weights
        finetune.check_quantization(args.config, _quantization(args))
    except InputError as e:
        raise InputError(f"--{_quantization(args)}: {e}") from None
    args.examples, args.bad = finetune.read_examples(args.data, task=args.task, language=args.language)
    args.eval_examples = []
    if args.eval_data:  # held-out data must be whole: a skipped line would change what eval_loss means
        args.eval_examples, bad = finetune.read_examples(args.eval_data, task=args.task, language=args.language)
        if bad:
            raise InputError(f"{len(bad)} line(s) of --eval-data cannot be evaluated:\n  " + "\n  ".join(bad[:20]))
        if not args.eval_examples:
            raise InputError(f"--eval-data {args.eval_data}: no examples")
        if args.eval_task:
            finetune.reply_languages(args.eval_examples, args.eval_task)
    elif args.eval_task or args.eval_every:
        raise InputError("--eval-task and --eval-every need --eval-data")
    if args.bad and not args.skip_bad:
        shown = "\n  ".join(args.bad[:20]) + (f"\n  … and {len(args.bad) - 20} more" if len(args.bad) > 20 else "")
        raise InputError(f"{len(args.bad)} of {len(args.bad) + len(args.examples)} lines cannot be trained on "
                         f"(fix them, or --skip-bad to train on the rest):\n  {shown}")
    if not args.examples:
        raise InputError(f"{args.data}: no line can be trained on")
    args.result = args.output_dir / ("adapter" if adapter else "model")
    _plan_finetune_outputs(args)
    args.dtype = finetune.weights_dtype(args.config, args.dtype)


def _plan_finetune_outputs(args: argparse.Namespace) -> None:
    """What the run writes (checkpoint/, metrics.jsonl, tensorboard/, model/ or adapter/) must replace none of its
    inputs (the data files, the clips, the model) and go to a directory that can be written; a new run starts in a
    directory that holds no run's files, and --resume continues the run the checkpoint records (its settings, data,
    held-out data and model files)."""
    out = args.output_dir
    writes = [out / "checkpoint", out / "metrics.jsonl", out / "tensorboard", args.result]
    model = _local_model(args.model, resolving=args.resume)
    clips = {path.parent for e in (*args.examples, *args.eval_examples) for path in e.audio}
    refuse_inputs(writes, [args.data, *filter(None, [args.eval_data, model]), *clips])
    if model is not None and out.exists() and out.resolve() == model.resolve():
        raise OutputError(f"--output-dir {out} is the model's directory: the run's files would change its files")
    found = [path.name for path in writes if path.exists()]
    if found and not args.resume:
        raise InputError(f"{out} holds a run: --resume continues it, or choose another --output-dir (it holds "
                         f"{', '.join(found)})")
    if args.resume:
        inputs = {"model": fingerprint(model)} if model is not None else {}
        finetune.check_resume(out / "checkpoint", args.config,
                              finetune.run_inputs(args.examples, args.eval_examples, **inputs))
    if args.result.exists():
        raise InputError(f"{args.result} exists: this run is finished; choose another --output-dir")
    writable_directory(out)


def _local_model(name: str | Path, *, resolving: bool) -> Path | None:
    """The model's directory when it is named by path or, when `resolving`, found or fetched as loading would;
    else None (a repo id is looked up when the model loads, after the processes have joined)."""
    try:
        return resolve(name) if resolving or looks_like_path(name) else None
    except QwenAudioError:  # loading names the problem (exit 3)
        return None


def finetune_model(model: QwenAudio, args: argparse.Namespace) -> int:
    """Train, printing a line per step and one per checkpoint; write the fine-tuned checkpoint to OUTPUT_DIR/model
    (or the adapter to OUTPUT_DIR/adapter)."""
    total, started = args.config.steps, time.monotonic()

    def progress(record: dict) -> None:
        done = record["step"]
        eta = (time.monotonic() - started) / max(done - first, 1) * (total - done)
        evaluated = "".join(f" {key} {value:.4f}" for key, value in record.items()
                            if key.startswith("eval_") and key != "eval_tokens" and isinstance(value, float))
        print(f"step {done}/{total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
              f"{record['tokens'] / max(record['seconds'] - last[0], 1e-9):.0f} label tokens/s "
              f"ETA {int(eta) // 60}:{int(eta) % 60:02d}{evaluated}", file=sys.stderr, flush=True)
        last[0] = record["seconds"]

    def saved(step: int) -> None:
        print(f"checkpoint saved at step {step}/{total}: {args.output_dir / 'checkpoint'}", file=sys.stderr, flush=True)

    last, first = [0.0], 0
    if args.resume:
        first = len(json.loads((args.output_dir / "checkpoint" / "progress.json").read_text())["losses"])
    try:
        finetune.train(model, args.examples, args.output_dir, args.config, eval_examples=args.eval_examples,
                       resume=args.resume, progress=progress, saved=saved,
                       inputs={"model": fingerprint(resolve(args.model))})
        if not args.config.lora:  # every process takes part (a sharded model is gathered); process 0 writes
            target = finetune.save_model(model, resolve(args.model), args.result)
        elif args.rank == 0:
            with finetune.output_errors(args.result):
                target = lora.save_adapter(model, args.result, base_model=str(args.model))
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.rank:
        return 0
    print(f"wrote {target}" + (f"; {len(args.bad)} bad line(s) skipped:\n  " + "\n  ".join(args.bad)
                               if args.bad else ""), file=sys.stderr)
    return 0


def merge_adapter(_: None, args: argparse.Namespace) -> int:
    """Fold ADAPTER into BASE, merged in fp32 and stored in --dtype, and write TARGET (BASE is only read)."""
    return _write_checkpoint(lambda: lora.merge_checkpoint(resolve(args.base), args.adapter_dir, args.target,
                                                           dtype=args.dtype, overwrite=args.overwrite), args.target)


def _write_checkpoint(write: Callable[[], object], target: Path) -> int:
    """Run a command that writes a checkpoint directory: exit 1 when it cannot be written (or would replace an
    input), 2 for bad arguments, 3 for an unusable source or adapter."""
    try:
        write()
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except QwenAudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"wrote {target}", file=sys.stderr)
    return 0


CHAT_HELP = """/audio PATH   attach a clip to the next question (checked at once)
/reset        forget the conversation and the attached clips
/help         this list
/quit         leave (so does end of input, Ctrl-D)
A line that starts with // is sent as text, with one / removed; so is any line that starts with / but not with
/word followed by a space or the end (/tmp/a.wav, / 2, /5)."""
CHAT_COMMAND = re.compile(r"/(?P<name>[A-Za-z]\w*)(?:\s+(?P<argument>.*))?")


def chat_loop(model: QwenAudio, args: argparse.Namespace) -> int:
    """Read stdin a line at a time and stream each reply to stdout. `/word` lines are commands (CHAT_HELP) and never
    reach the model; a bad clip is refused when attached; Ctrl-C during a reply drops that reply only."""
    chat, clips = Chat(model, args.system), []
    prompt = "> " if sys.stdin.isatty() else ""
    generation = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            print(prompt and "\n", end="")  # on a terminal, the shell's prompt starts on a line of its own
            return 0
        command = CHAT_COMMAND.fullmatch(line)
        if command and command["name"] == "quit" and not command["argument"]:
            return 0
        if command:
            error = _chat_command(chat, clips, command["name"], command["argument"])
            if error:
                print(f"error: {error}", file=sys.stderr, flush=True)
        elif line:
            _reply(chat, [*clips, line.removeprefix("/") if line.startswith("//") else line], generation)
            clips.clear()


def _chat_command(chat: Chat, clips: list[dict], name: str, argument: str | None) -> str | None:
    """Run one chat command; the error to show, if any (nothing is sent to the model)."""
    if name == "audio":
        if not argument:
            return "/audio needs a path: /audio PATH"
        try:
            seconds = len(chat.clip(argument)) / SAMPLE_RATE
        except QwenAudioError as e:
            return f"{e} (not attached)"
        clips.append({"audio": argument})
        print(f"attached {argument} ({seconds:.1f} s) to the next question", file=sys.stderr, flush=True)
        return None
    if name in ("reset", "help", "quit") and argument:
        return f"/{name} takes no argument (start the line with // to send it as text)"
    if name == "reset":
        chat.reset()
        clips.clear()
    elif name == "help":
        print(CHAT_HELP, file=sys.stderr, flush=True)
    else:
        return (f"unknown command /{name}: the commands are /audio PATH, /reset, /help, /quit; start the line with "
                "// to send it as text")
    return None


def _reply(chat: Chat, query: list, generation: dict) -> None:
    """Stream the reply to `query`; a bad clip or setting spoils only this question, and Ctrl-C drops this reply
    (the conversation goes on without it; SIGTERM still ends the command)."""
    try:
        for piece in chat.stream(query, **generation):
            print(piece, end="", flush=True)
        print()
    except QwenAudioError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            raise
        print(flush=True)
        print("interrupted: this reply is dropped; /quit or Ctrl-D leaves", file=sys.stderr, flush=True)


def _tolerance(text: str) -> float:
    """verify's --rtol, --atol, --isolated-rtol: a finite number >= 0 (nan would fail every tensor silently)."""
    try:
        value = float(text)
        trace.check_tolerance(value, "tolerance")
    except (ValueError, InputError):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}") from None
    return value


def plan_trace(args: argparse.Namespace) -> None:
    """Before the model loads: the prompt (not empty, its tags closed), its clips readable, and --out."""
    _check_trace_out(args.out, [*_readable_clips(trace.prompt_clips(args.prompt)), *_model_files(args.model)])


def plan_verify(args: argparse.Namespace) -> None:
    """Before the model loads: both traces (or the reference and the clips of its prompt, which ours is recorded
    from), --out, and the dtype to record in (the reference's, to compare like with like)."""
    args.reference = trace.Trace.load(args.traces[-1])
    if not args.model:
        args.ours = trace.Trace.load(args.traces[0])
        return
    manifest = args.reference.manifest
    try:
        clips = _readable_clips(trace.prompt_clips(manifest.get("prompt")))
    except InputError as e:
        raise InputError(f"{args.traces[-1]}: its prompt cannot be recorded: {e}") from None
    if args.out:
        _check_trace_out(args.out, [*args.traces, *clips, *_model_files(args.model)])
    dtype = manifest.get("model", {}).get("dtype")
    if not args.dtype and dtype not in trace.RTOL:
        raise InputError(f"{args.traces[-1]}: the reference's dtype {dtype!r} is not one we load: give --dtype")
    args.dtype = args.dtype or dtype


def _readable_clips(paths: list[str]) -> list[str]:
    """`paths` (a prompt's clips), each checked as the model would read it."""
    for path in paths:
        try:
            as_waveform(Path(path), path)
        except AudioError as e:
            raise InputError(f"the prompt's clip {e}") from None
    return paths


def _model_files(model: str | None) -> list[Path]:
    """The files of a local checkpoint directory (a repo id is not local yet)."""
    path = Path(model) if model else None
    return [*path.iterdir(), path] if path and path.is_dir() else []


def _check_trace_out(out: Path, reads: list) -> None:
    """--out is none of the inputs (a clip, a trace, a model file), replaces only an older trace, and can be
    written: all found before the model loads (OutputError)."""
    refuse_inputs([out], reads)
    if out.is_dir():
        raise OutputError(f"--out {out} is a directory: give the .safetensors file to write")
    if out.is_symlink() and not out.exists() or out.exists() and not out.is_file():  # opening a pipe would wait
        raise OutputError(f"--out {out} is not a regular file (a pipe, a device or a symlink that leads nowhere): "
                          "choose another name")
    if out.exists() and not trace.is_trace(out):
        raise OutputError(f"--out {out} exists and is not a trace: remove it or choose another name")
    try:
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        raise OutputError(f"--out {out}: cannot write in {out.parent} ({e.strerror or e})") from None


def trace_prompt(model: QwenAudio, args: argparse.Namespace) -> int:
    trace.record(model, args.prompt, project=args.project, logits=args.logits).save(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def quantize_checkpoint(_: None, args: argparse.Namespace) -> int:
    return _write_checkpoint(lambda: save_quantized(args.source, args.target, bits=args.bits,
                                                    group_size=args.group_size, overwrite=args.overwrite,
                                                    progress=report_progress), args.target)


def verify_traces(model: QwenAudio | None, args: argparse.Namespace) -> int:
    """Print the per-tensor table of the stages both traces hold and what each lacks; the first tensor out of
    tolerance is where the implementations part. With the model at hand, also each layer on the reference's own
    input (`trace.isolate`), which needs a full-size reference holding every stage; else say what it lacks."""
    reference, isolated, blocker = args.reference, None, None
    if model is None:
        ours = args.ours
    else:
        m = reference.manifest
        ours = trace.record(model, m["prompt"], project=m.get("project"), logits=m.get("logits", "last"))
        if args.out:
            ours.save(args.out)
        blocker = trace.isolation_blocker(model, reference)
        isolated = None if blocker else trace.isolate(model, reference, rtol=args.isolated_rtol)
    rows = trace.compare(ours, reference, rtol=args.rtol, atol=args.atol)
    lacking, ours_lacking = trace.unmatched(ours, reference)
    print(trace.format_table(rows, isolated))
    failed = [r for r in rows if not r.ok]
    rtol = trace.default_rtol(ours, reference) if args.rtol is None else args.rtol
    looser = "".join(f", {r.name} {r.rtol:g}" for r in rows if r.rtol != rtol)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} tensors within rtol {rtol:g}{looser}" +
          (f"; first divergence: {failed[0].name}" if failed else ""))
    if lacking:
        print(f"not in the reference, so not compared: {trace.name_list(lacking)}")
    if ours_lacking:
        print(f"FAIL: the reference has {trace.name_list(ours_lacking)}, ours does not")
    other_model = trace.models_note(ours, reference)
    if other_model:  # whatever the rows say, these are not the same computation
        print(f"FAIL: {other_model}")
    if isolated is not None:
        alone_failed = [r for r in isolated if not r.ok]
        print(f"{len(isolated) - len(alone_failed)} of {len(isolated)} layers within isolated rtol "
              f"{isolated[0].rtol:g} on the reference's own inputs" +
              (f"; first isolated failure: {alone_failed[0].name}" if alone_failed else ""))
    elif model is not None:
        print(f"isolated: not available, {blocker}")
    return 1 if failed or ours_lacking or other_model or any(not r.ok for r in isolated or []) else 0
