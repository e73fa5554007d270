"""`qwenaudio transcribe`: a task on audio files, a batch at a time, to stdout and, with --output-dir, a file per
input (resumable; shared between torchrun's processes). Either family: the task, language and timestamp options are
checked against the model's (`prompts.family_tasks`), before it loads where config.json or the repo id tells."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import tasks
from ..batch import (AUDIO_SUFFIXES, Job, check_names, claim_outputs, find_inputs, model_identity,
                     refuse_many_inputs, refuse_model_directory)
from ..core.errors import InputError
from ..core.families import Family
from ..core.files import refuse_inputs, writable_directory, write_text
from ..core.model import QwenAudio
from ..core.tokenizer import LANGUAGES
from ..hub import family_of_checkpoint
from ..longform import Segment
from ..prompts import QWEN2_LANGUAGES, Instruction, Prompt, family_tasks
from ..runner import Report
from ..subtitles import Word, to_json, to_srt, to_vtt
from .options import Plan, UsageError, add_model_options, freeze, loaded_dtype, positive

TASK_CHOICES = ("transcribe", "translate", *tasks.ANALYSES)
LANGUAGE_CHOICES = tuple(dict.fromkeys((*LANGUAGES, *QWEN2_LANGUAGES)))  # each family takes its own (task_prompt)
FORMATS = ("txt", "json", "srt", "vtt")  # --format all writes each
TIMED_FORMATS = ("srt", "vtt")
SHARES_WORK = True  # under torchrun, the processes share the files
PARSER = dict(help="transcribe, translate, caption or classify audio files",
              description="Run a Qwen-Audio or Qwen2-Audio task on audio files, a batch at a time.",
              epilog="exit status: 0 all files done, 1 some failed (see stderr), --output-dir cannot "
                     "be written, or an output would replace an input or a file the command did "
                     "not write, 2 bad arguments or "
                     "other settings than the outputs' (both found before the model loads), 3 the "
                     "model could not be loaded, 130 interrupted, 143 on SIGTERM (summary.json still "
                     "written)")


@dataclass(frozen=True, kw_only=True)
class TranscribePlan(Plan):
    """The options, resolved (timestamps implied by a timed format, languages defaulted), the inputs found, those
    still to do and, with --output-dir, the record claimed in summary.json."""
    files: list[Path]
    task: str
    language: str
    target_language: str
    itn: bool
    timestamps: bool
    format: str
    output_dir: Path | None
    overwrite: bool
    batch_size: int
    max_new_tokens: int | None
    formats: tuple[str, ...]
    jobs: list[Job]
    todo: list[Job]
    record: dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE|DIR",
                        help="audio files (wav, flac, ogg, mp3, any length), or directories searched for them")
    parser.add_argument("--task", choices=TASK_CHOICES, default="transcribe", metavar="TASK",
                        help=f"{', '.join(TASK_CHOICES)}; default transcribe")
    parser.add_argument("--language", choices=LANGUAGE_CHOICES, metavar="LANG",
                        help=f"transcribe, translate: the spoken language, one of {' '.join(LANGUAGES)} (Qwen2-Audio: "
                             f"{' '.join(QWEN2_LANGUAGES)}); default en")
    parser.add_argument("--target-language", choices=LANGUAGE_CHOICES, metavar="LANG",
                        help="translate: the output language; default zh")
    parser.add_argument("--itn", action="store_true",
                        help="transcribe: write numbers and symbols as written ($5; Qwen-Audio only)")
    parser.add_argument("--timestamps", action="store_true",
                        help="transcribe: time every word (implied by srt, vtt; Qwen-Audio only)")
    parser.add_argument("--format", choices=(*FORMATS, "all"), default="txt",
                        help="what stdout and --output-dir get; all: every format, into --output-dir; default txt")
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="also write <name>.<format> per file here (and summary.json); files whose outputs exist "
                             "are skipped, so an interrupted run resumes")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo files whose outputs exist, with any settings, and replace files of the outputs' "
                             "names that this command did not write (never an input)")
    parser.add_argument("--batch-size", type=positive, default=4, metavar="N",
                        help="files per forward pass; default 4")
    add_model_options(parser, "Qwen/Qwen-Audio")


def plan(args: argparse.Namespace) -> TranscribePlan:
    """The options that do not go together (UsageError), resolved (timestamps implied by a timed format, languages
    defaulted), then the inputs and outputs (`_plan_outputs`)."""
    timestamps = args.timestamps or args.format in (*TIMED_FORMATS, "all")
    if timestamps and args.task != "transcribe":
        raise UsageError("word timestamps (--timestamps, --format srt, vtt or all) come only with --task transcribe")
    if args.format == "all" and not args.output_dir:
        raise UsageError("--format all writes files: give --output-dir")
    ignored = [option for option, used in (
        ("--itn", not args.itn or (args.task == "transcribe" and not timestamps)),
        ("--language", args.language is None or args.task in ("transcribe", "translate")),
        ("--target-language", args.target_language is None or args.task == "translate")) if not used]
    if ignored:
        what = "word timestamps" if args.task == "transcribe" else f"--task {args.task}"
        raise UsageError(f"{' and '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with {what}")
    resolved = {"timestamps": timestamps, "language": args.language or "en",
                "target_language": args.target_language or "zh"}
    family = family_of_checkpoint(args.model)
    if family is not None:
        try:
            task_prompt(family, args.task, args.itn, **resolved)
        except InputError as e:
            raise UsageError(str(e)) from None
    return _plan_outputs(args, resolved)


def task_prompt(family: Family, task: str, itn: bool, *, language: str, target_language: str,
                timestamps: bool) -> Prompt | Instruction:
    """The prompt the options ask of `family`'s model (`tasks.task_prompt`): a task, language or option it does
    not have is the InputError the library gives, said once for the whole run (timestamps in the options' words)."""
    if timestamps and not family_tasks(family).timestamps:
        raise InputError(f"{family.name} has no timestamps: --timestamps and --format srt, vtt and all (word times) "
                         "need a Qwen-Audio model; use --format txt or json")
    return tasks.task_prompt(family, task, language=language, target_language=target_language, itn=itn,
                             timestamps=timestamps)


def resume_hint(_: argparse.Namespace) -> str:
    return "rerun the same command to resume: files done are kept"


def _plan_outputs(args: argparse.Namespace, resolved: dict) -> TranscribePlan:
    """Before any model loads: find the inputs (every path must exist, and some audio must be found), check the
    output directory can be written and claim the outputs there (`_claim_outputs`), and set aside the files whose
    outputs already exist (the plan's `jobs`, `todo`)."""
    jobs = find_inputs(args.files)
    if not jobs:
        raise InputError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) found in {', '.join(map(str, args.files))}")
    formats = FORMATS if args.format == "all" else (args.format,)
    if not args.output_dir:
        return freeze(TranscribePlan, args, **resolved, formats=formats, jobs=jobs, todo=jobs, record={})
    check_names(jobs)
    writable_directory(args.output_dir)
    outputs = {job: [_output(args.output_dir, job, f) for f in formats] for job in jobs}
    record = _claim_outputs(args, resolved, jobs, [p for paths in outputs.values() for p in paths])
    todo = [j for j in jobs if args.overwrite or not all(p.exists() for p in outputs[j])]
    return freeze(TranscribePlan, args, **resolved, formats=formats, jobs=jobs, todo=todo, record=record)


def _claim_outputs(args: argparse.Namespace, resolved: dict, jobs: list[Job], outputs: list[Path]) -> dict:
    """Refuse an output that is an input (an audio file, the model's files) under any name, then claim the outputs
    in summary.json (`batch.claim_outputs`: where earlier outputs exist, the settings must be theirs)."""
    directory, record_file = args.output_dir, args.output_dir / "summary.json"
    model_files, key = model_identity(args.model, args.adapter)
    refuse_model_directory(directory, model_files)
    refuse_inputs([record_file], [*args.files, *model_files])
    refuse_many_inputs([record_file, *outputs], [*(job.path for job in jobs), *model_files])
    settings = {"task": args.task, "language": resolved["language"], "target_language": resolved["target_language"],
                "itn": args.itn, "timestamps": resolved["timestamps"], "max_new_tokens": args.max_new_tokens,
                "model": str(args.model), **key, "dtype": loaded_dtype(args), "quantization": args.quantize}
    return claim_outputs(record_file, "transcribe", [str(p.relative_to(directory)) for p in outputs], settings,
                         overwrite=args.overwrite, files=len(jobs), done=[], skipped=[], failed=[],
                         interrupted=False, finished=False)


def run(model: QwenAudio, plan: TranscribePlan) -> int:
    """Inputs are batched by length and shared between processes (`qwenaudio.runner`); a file that cannot be read,
    recognised or written is reported and the others go on. Outputs are written under temporary names and renamed,
    so an output that exists is complete; stdout gets the files in input order. summary.json (rank 0) lists the
    files done, skipped and failed, also after Ctrl-C."""
    task_prompt(model.family, plan.task, plan.itn, language=plan.language, target_language=plan.target_language,
                timestamps=plan.timestamps)  # what planning could not check before the model loaded
    processes, jobs, todo = plan.processes, plan.jobs, plan.todo
    printing = processes.world == 1 and plan.format != "all"
    shown = InputOrder(todo if printing else [])
    documents: dict[Path, str] = {}
    progress = processes.progress("files")

    def write(job: Job, result: tuple[str, list[Word], list[Segment]]) -> None:
        for fmt in plan.formats:
            document = render(fmt, job.path, *result, plan.task)
            if plan.output_dir:
                target = _output(plan.output_dir, job, fmt)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_text(target, document)
            if printing:
                documents[job.path] = _for_stdout(job, fmt, document, single=len(jobs) == 1)

    def summarize(reports: list[Report], interrupted: bool) -> None:
        if interrupted:  # what has finished is printed, in order, though earlier files have not
            shown.flush()
        planned = set(todo)
        summary = {**plan.record, "files": len(jobs),
                   "done": [path for report in reports for path in report.done],
                   "skipped": [str(j.path) for j in jobs if j not in planned],
                   "failed": [line for report in reports for line in report.failed],
                   "processes": processes.world, "interrupted": interrupted, "finished": not interrupted}
        if plan.output_dir:
            try:
                write_text(plan.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            except OSError as e:
                print(f"error: could not write {plan.output_dir / 'summary.json'}: {e}", file=sys.stderr)
        print(f"{len(summary['done'])} done, {len(summary['skipped'])} skipped (outputs exist), "
              f"{len(summary['failed'])} failed, of {len(jobs)} files" + (" (interrupted)" if interrupted else ""),
              file=sys.stderr)

    _, reports = processes.run(
        todo, lambda batch, clips: run_task(model, batch, clips, plan), write, summarize,
        min_samples=model.encoder.min_samples, batch_size=plan.batch_size,
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


def run_task(model: QwenAudio, jobs: list[Job], clips: list[torch.Tensor], plan: TranscribePlan
             ) -> list[tuple[str, list[Word], list[Segment]]]:
    """(text, words, segments) per clip (`tasks.perform`); words come only from timed transcription. Any length: a
    long file reports its windows as they are done."""
    files = plan.processes.progress("files")

    def windows(i: int, finished: int, total: int) -> None:
        files.line(f"{jobs[i].path}: {finished}/{total} windows")

    results = tasks.perform(model, clips, plan.task, language=plan.language, target_language=plan.target_language,
                            itn=plan.itn, timestamps=plan.timestamps, progress=windows,
                            max_new_tokens=plan.max_new_tokens)  # None keeps the task's own budget
    return [(r.text, r.words, r.segments) for r in results]


def render(fmt: str, path: Path, text: str, words: list[Word], parts: list[Segment], task: str) -> str:
    if fmt == "json":
        segments = [{"text": s.text, "start": s.start, "end": s.end} for s in parts]
        return to_json(text, words, segments=segments, file=str(path), task=task)
    if fmt in TIMED_FORMATS:  # a reply without timestamps is one cue over its window, not an empty one
        shown = tasks.subtitle_cues(parts)
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


def _output(directory: Path, job: Job, fmt: str) -> Path:
    return directory / job.name.with_name(f"{job.name.name}.{fmt}")
