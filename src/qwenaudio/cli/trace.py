"""`qwenaudio trace`: record every layer's activations for one prompt; and the checks of a trace's prompt and
--out that `qwenaudio verify` shares."""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import trace
from ..batch import shortest_clip
from ..core.audio import as_waveform
from ..core.errors import AudioError, InputError, OutputError
from ..core.families import Family
from ..core.files import refuse_inputs
from ..core.model import QwenAudio
from ..core.qwen2_tokenizer import AUDIO_REGION
from ..hub import family_of_checkpoint
from .options import Plan, add_model_options, freeze, positive

PARSER = dict(help="record every layer's activations for one prompt",
              description="Run one prompt (a prefill, no generation) and write its activations "
                          "in the format tools/record_official.py writes for the official code "
                          "(tools/record_transformers.py for transformers' Qwen2-Audio).",
              epilog="exit status: 0 written, 1 --out cannot be written or would replace an input "
                     "(found before the model loads) or the disk is full, 2 a bad prompt or clip "
                     "(found before the model loads), 3 the model could not be loaded")


@dataclass(frozen=True, kw_only=True)
class TracePlan(Plan):
    prompt: str
    audio: list[str]
    out: Path
    project: int | None
    logits: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt; Qwen-Audio's names its clips in "
                        f"<audio>PATH</audio> regions, Qwen2-Audio's holds {AUDIO_REGION} per clip")
    parser.add_argument("--audio", action="append", default=[], metavar="PATH",
                        help="Qwen2-Audio: the clip of the prompt's next <|AUDIO|> (repeat it for each, in order)")
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    parser.add_argument("--project", type=positive, metavar="K",
                        help="project wide tensors onto K fixed random columns (keeps full-size traces small)")
    parser.add_argument("--logits", choices=("last", "all"), default="last", help="which positions' logits to keep")
    add_model_options(parser, "Qwen/Qwen-Audio")


def plan(args: argparse.Namespace) -> TracePlan:
    """Before the model loads: the prompt (not empty, its tags closed), its clips readable, and --out."""
    clips = readable_clips([*trace.prompt_clips(args.prompt), *args.audio], family_of_checkpoint(args.model))
    check_trace_out(args.out, [*clips, *model_files(args.model)])
    return freeze(TracePlan, args)


def run(model: QwenAudio, plan: TracePlan) -> int:
    trace.record(model, plan.prompt, clips=plan.audio or None, project=plan.project,
                 logits=plan.logits).save(plan.out)
    print(f"wrote {plan.out}", file=sys.stderr)
    return 0


def readable_clips(paths: list[str], family: Family | None = None) -> list[str]:
    """`paths` (a prompt's clips), each checked as a model of `family` (None: not known yet) would read it."""
    for path in paths:
        try:
            as_waveform(Path(path), path, shortest_clip(family))
        except AudioError as e:
            raise InputError(f"the prompt's clip {e}") from None
    return paths


def model_files(model: str | None) -> list[Path]:
    """The files of a local checkpoint directory (a repo id is not local yet)."""
    path = Path(model) if model else None
    return [*path.iterdir(), path] if path and path.is_dir() else []


def check_trace_out(out: Path, reads: list) -> None:
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
