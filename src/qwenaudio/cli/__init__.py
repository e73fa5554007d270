"""The `qwenaudio` command: run a task on audio files in batches, chat about clips on a terminal, serve a model over
an OpenAI-compatible HTTP API, or record and compare activation traces against the official model.

Results go to stdout (and, with --output-dir, one file per input); progress and errors go to stderr, so
`qwenaudio transcribe talk.wav --format srt > talk.srt` works. A file that cannot be read is reported and the others
go on. Exit codes: 0 all done, 1 some file failed (verify: some tensor is out of tolerance), 2 bad arguments or
unusable trace files, 3 the model could not be loaded.

Each command is a module of this package with three functions: `add_arguments(parser)`, `plan(args)` (everything
checked before the model loads, as a frozen plan; UsageError for options that do not go together) and
`run(model, plan)` (the exit code), plus `PARSER` (its --help texts) and, where they apply, `SHARES_WORK` (torchrun's
processes share its work), `READS_CHECKPOINT` (a checkpoint `run` cannot read exits 3) and `resume_hint(args)` (what
an interrupted run says: how to go on without losing what is done). This module parses, loads the model once, turns
errors into exit codes and interrupts into the command's resume hint: adding a command is adding its module to
COMMANDS.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from types import ModuleType

import torch

from ..core.errors import InputError, OutputError, QwenAudioError
from ..hub import load
from ..runner import Processes, leave_process_group
from . import chat, evaluate, finetune, merge, quantize, serve, trace, transcribe, verify
from .options import Terminated, UsageError

__all__ = ["COMMANDS", "Terminated", "main", "parse"]

COMMANDS: dict[str, ModuleType] = {module.__name__.rsplit(".", 1)[1]: module for module in (
    transcribe, chat, serve, evaluate, finetune, trace, verify, quantize, merge)}


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
        resume_hint = getattr(COMMANDS[args.command], "resume_hint", None)
        hint = resume_hint and resume_hint(args)
        print("interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
        return 128 + (e.args[0] if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        leave_process_group()


def run(args: argparse.Namespace) -> int:
    """Plan (everything that can be checked before the model loads), join torchrun's processes, load the model,
    run; every error becomes its exit code here (`_failed`)."""
    command = COMMANDS[args.command]
    reads_checkpoint = getattr(command, "READS_CHECKPOINT", False)
    try:
        plan = command.plan(args)
    except UsageError as e:  # options that do not go together: as argparse says it
        parser = _parser()[1][args.command]
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except QwenAudioError as e:  # transcribe, evaluate: the model their outputs are keyed on cannot be found
        return _failed(e, reading=True)
    if getattr(command, "SHARES_WORK", False):
        plan = replace(plan, processes=Processes.join(plan.device))
    if plan.processes.world > 1 and not plan.output_dir:
        print("error: several processes write files only: give --output-dir", file=sys.stderr)
        return 2
    device = plan.device
    if plan.processes.world > 1 and device == "cuda":  # torchrun's process on its own GPU
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        model = plan.model and load(plan.model, device=device, dtype=plan.dtype, quantize=plan.quantize,
                                    adapter=plan.adapter, progress=plan.processes.rank == 0)
    except QwenAudioError as e:  # a missing checkpoint's message says how to get one
        print(f"error: {e}", file=sys.stderr)
        return 3
    try:
        return command.run(model, plan)
    except (QwenAudioError, OSError) as e:  # e.g. a file that is not a trace, a full disk, an unclosed <audio> tag
        return _failed(e, reading=reads_checkpoint)


def _failed(error: Exception, *, reading: bool) -> int:
    """Say `error` and return its exit code: 1 an output cannot be written (a full disk, a read-only directory) or
    would replace an input, 2 bad arguments or inputs, 3 the model or checkpoint being read cannot be (any other
    qwenaudio error while `reading`; after, 2), 1 any other OSError (e.g. a trace that cannot be written)."""
    print(f"error: {error}", file=sys.stderr)
    if isinstance(error, OutputError):
        return 1
    if isinstance(error, InputError):
        return 2
    if isinstance(error, QwenAudioError):
        return 3 if reading else 2
    return 1


def _warn(message: Warning | str, *_) -> None:
    """Library warnings (a budget cut to the context, …) as one `warning:` line, like errors."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser, _ = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "device", None) == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    return args


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each command's, from COMMANDS."""
    parser = argparse.ArgumentParser(prog="qwenaudio", description="Qwen-Audio, Qwen-Audio-Chat, Qwen2-Audio and Qwen2-Audio-Instruct in pure PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, command in COMMANDS.items():
        parsers[name] = commands.add_parser(name, **command.PARSER)
        command.add_arguments(parsers[name])
    return parser, parsers
