"""Many files at once: finding them, ordering them into batches, resuming, and sharing them between processes.

Files are batched by length (longest first), so a batch wastes little on left padding and the slowest batches
start first. Under `torchrun --nproc-per-node N` every process sees the same batches and takes every N-th one
(torch.distributed tells it which), so each file is done exactly once and a batch holds the same files whatever N
is: the outputs do not depend on the number of processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import soundfile as sf
import torch
import torch.distributed as dist
from torch import Tensor

from .core.audio import as_waveform
from .core.errors import InputError, QwenAudioError

R = TypeVar("R")
J = TypeVar("J")  # a Job, or anything with its `path` and `label` (an evaluation example)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")  # what load_audio reads (libsndfile)


@dataclass(frozen=True)
class Job:
    path: Path  # the input file
    name: Path  # where its outputs go under the output directory, without the format's suffix

    @property
    def label(self) -> str:
        """How messages name the file."""
        return str(self.path)


def find_inputs(paths: list[Path]) -> list[Job]:
    """Files as given, plus every audio file below each directory (its outputs keep the relative path), in the
    order given; a file found twice is done once. A path that does not exist is an error, found before any work."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(f"no such file or directory: {', '.join(missing)}")
    jobs: list[Job] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            jobs += [Job(p, p.relative_to(path).with_suffix("")) for p in found]
        else:
            jobs.append(Job(path, Path(path.stem)))
    return list({job.path: job for job in jobs}.values())


def check_names(jobs: list[Job]) -> None:
    """Refuse two inputs that would write outputs of the same name (only matters when outputs are written)."""
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.name in seen and seen[job.name] != job.path:
            raise InputError(f"{seen[job.name]} and {job.path} would both write outputs named {job.name}")
        seen[job.name] = job.path


def seconds(path: Path) -> float:
    """Length from the file's header (0 when unreadable: the error is reported when the file is loaded)."""
    try:
        return sf.info(str(path)).duration
    except Exception:  # noqa: BLE001 - libsndfile raises several kinds; all mean "cannot tell"
        return 0.0


def plan_batches(jobs: Sequence[J], batch_size: int) -> list[list[J]]:
    """Batches of files of similar length, longest first; equal lengths keep the input order. Every process
    plans the same batches from the same arguments."""
    ordered = sorted(jobs, key=lambda j: -seconds(j.path))  # stable
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def run_files(jobs: Sequence[J], recognize: Callable[[list[J], list[Tensor]], list[R]],
              write: Callable[[J, R], None], *, batch_size: int = 8, rank: int = 0, world: int = 1,
              progress: Callable[[int, int, list[J]], None] | None = None) -> Iterator[tuple[J, str | None]]:
    """Recognise `jobs` (`Job`s, or anything with the audio's `path` and a `label` for messages) a batch at a time
    (this process's share of `plan_batches`) and `write` each result, yielding (job, None) for each file done and
    (job, "message") for each that failed, as soon as it is known.

    Each file is read and checked before its batch runs, so a file that cannot be read or is too short fails alone.
    When a batch fails as a whole, its files are tried one at a time, so only a bad one fails, under its own name.
    A result that cannot be written (a full disk) fails its file; the others go on. `progress(finished, total,
    batch)` is called after each batch. Failures are also logged on stderr as `error: label: message`."""
    mine = plan_batches(jobs, batch_size)[rank::world]
    finished, total = 0, sum(len(b) for b in mine)
    for batch in mine:
        loaded: list[tuple[Job, Tensor]] = []
        for job in batch:
            try:
                loaded.append((job, as_waveform(job.path, str(job.path))))
            except QwenAudioError as e:
                yield job, _report(job, e)
        for job, outcome in _recognize(loaded, recognize):
            if isinstance(outcome, Exception):
                yield job, _report(job, outcome)
                continue
            try:
                write(job, outcome)
            except OSError as e:
                yield job, _report(job, f"could not write its output: {e}")
                continue
            yield job, None
        finished += len(batch)
        if progress:
            progress(finished, total, batch)


RECOVERABLE = (QwenAudioError, RuntimeError)  # library errors, and torch's (out of memory, a failing kernel)


def _recognize(loaded: list[tuple[J, Tensor]], recognize: Callable) -> list[tuple[J, object]]:
    """(job, result) per file: the batch at once, or, if that raises, each file alone (its error as the result)."""
    if not loaded:
        return []
    jobs, clips = [j for j, _ in loaded], [c for _, c in loaded]
    try:
        return list(zip(jobs, recognize(jobs, clips)))
    except RECOVERABLE as e:
        if len(loaded) == 1:
            return [(jobs[0], e)]
    out: list[tuple[J, object]] = []
    for job, clip in loaded:
        try:
            out.append((job, recognize([job], [clip])[0]))
        except RECOVERABLE as e:
            out.append((job, e))
    return out


def _report(job: J, error: Exception | str) -> str:
    """`error: label: message` on stderr, without repeating the path that library messages often start with; the
    line is returned for the summary."""
    message = str(error) if isinstance(error, QwenAudioError | str) else f"{type(error).__name__}: {error}"
    line = f"{job.label}: {message.removeprefix(f'{job.path}: ')}"
    print(f"error: {line}", file=sys.stderr, flush=True)
    return line


def process_group(device: str | None) -> tuple[int, int]:
    """(rank, world size): joins torchrun's process group when started under torchrun (gloo on CPU, nccl on
    CUDA), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device and device.startswith("cuda") else "gloo")
    if device and device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def leave_process_group() -> None:
    """Leave torchrun's process group, if joined: gloo's threads must stop before the interpreter does, or a
    process can abort while exiting ("terminate called without an active exception") after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather(obj: object, world: int) -> list[object]:
    """Every process's `obj`, in rank order (just [obj] in a single process)."""
    if world == 1:
        return [obj]
    out: list[object] = [None] * world
    dist.all_gather_object(out, obj)
    return out
