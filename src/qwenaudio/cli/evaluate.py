"""`qwenaudio evaluate`: one of the paper's benchmarks (Qwen-Audio's tasks, or Qwen2-Audio's datasets for a
Qwen2-Audio model), with the official prompt, decoding and scoring (resumable; shared between torchrun's
processes)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import evaluation, prompts
from ..core.model import QwenAudio
from ..core.tokenizer import LANGUAGES
from .options import Plan, add_model_options, freeze, loaded_dtype, positive

SHARES_WORK = True  # under torchrun, the processes share the examples
PARSER = dict(help="run one of the paper's benchmarks as the official script does",
              description="Run a benchmark on an official-format JSON Lines file (the converted "
                          "files eval_audio/EVALUATION.md downloads) with the official prompt, "
                          "decoding and scoring; replies are kept as they come, so a rerun "
                          "into the same --output-dir resumes.",
              epilog="exit status: 0 every example replied to and scored, 1 some failed (listed "
                     "in summary.json), --output-dir cannot be written, or an output would "
                     "replace an input or a file the command did not write, 2 bad arguments, data or other "
                     "settings than "
                     "run.json's (all found before the model loads), 3 the model could not be "
                     "loaded, 130 interrupted, 143 on SIGTERM (summary still written)")


@dataclass(frozen=True, kw_only=True)
class EvaluatePlan(Plan):
    batch_size: int
    output_dir: Path
    benchmark: evaluation.Run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=[*evaluation.BENCHMARKS, *evaluation.QWEN2_BENCHMARKS], metavar="TASK",
                        help=f"Qwen-Audio: {', '.join(evaluation.BENCHMARKS)}; Qwen2-Audio (the official "
                             f"datasets): {', '.join(evaluation.QWEN2_BENCHMARKS)}")
    parser.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl",
                        help="one example per line: audio, gt, source (and question for aqa); Qwen2-Audio: audio, "
                             "source, prompt, gt (airbench_level3: audio, id, query)")
    parser.add_argument("--audio-root", type=Path, metavar="DIR",
                        help="where the rows' audio paths start; default: the current directory, as the official "
                             "scripts")
    parser.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                        help="run.json, replies/, examples.jsonl, summary.json and summary.md go here")
    parser.add_argument("--limit", type=positive, metavar="N", help="only the first N examples")
    parser.add_argument("--batch-size", type=positive, default=8, metavar="N", help="examples per batch; default 8")
    parser.add_argument("--language", choices=LANGUAGES, metavar="LANG",
                        help="asr, srwt: the spoken language of rows without a 'lang' field; default: from the "
                             "source's dataset (librispeech en, aishell zh); Qwen2-Audio's datasets fix their own")
    parser.add_argument("--caption-style", choices=prompts.CAPTION_STYLES, default="clotho",
                        help="caption: the output style tag; default clotho")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the replies of an earlier run, whatever its settings, and replace files of the "
                             "outputs' names that this command did not write (never an input)")
    add_model_options(parser, "Qwen/Qwen-Audio")


def plan(args: argparse.Namespace) -> EvaluatePlan:
    """The benchmark's plan (`evaluation.plan`): every line that cannot run is printed, before the model loads."""
    benchmark = evaluation.plan(
        args.task, args.data, args.output_dir, audio_root=args.audio_root, language=args.language,
        caption_style=args.caption_style, limit=args.limit, max_new_tokens=args.max_new_tokens,
        model_name=args.model + (f" ({args.quantize})" if args.quantize else "") +
        (f" + adapter {args.adapter.resolve()}" if args.adapter else ""), checkpoint=args.model,
        adapter=args.adapter, dtype=loaded_dtype(args), quantization=args.quantize, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # every line that cannot run, before the model loads
        for problem in benchmark.problems:
            print(f"error: {problem}", file=sys.stderr, flush=True)
    return freeze(EvaluatePlan, args, benchmark=benchmark)


def resume_hint(_: argparse.Namespace) -> str:
    return "rerun the same command to resume: the replies so far are kept"


DECODING_EVERY_S = 10.0  # seconds between "decoding a batch" lines while a batch decodes


def run(model: QwenAudio, plan: EvaluatePlan) -> int:
    """Run this process's share of the planned benchmark; process 0 prints the Markdown summary on stdout."""
    processes = plan.processes
    examples = processes.progress("examples")

    def progress(done: int, total: int, seconds: float) -> None:
        examples.rate(done, total, seconds)
        shown[0] = time.monotonic()

    def decoding(steps: int, budget: int) -> None:  # a batch with a large budget takes minutes: show it moves
        if time.monotonic() - shown[0] >= DECODING_EVERY_S:
            examples.line(f"decoding a batch: {steps}/{budget} new tokens")
            shown[0] = time.monotonic()

    shown = [time.monotonic()]
    summary = evaluation.execute(model, plan.benchmark, batch_size=plan.batch_size, processes=processes,
                                 progress=progress, decoding=decoding)
    if processes.rank == 0:
        print(evaluation.markdown(summary), end="")
        print(f"wrote {plan.output_dir / 'summary.json'}, summary.md and examples.jsonl", file=sys.stderr)
    return 1 if summary and not summary["complete"] else 0
