"""Many files at once: finding them, ordering them into batches, resuming, and sharing them between processes.

Files are batched by length (longest first), so a batch wastes little on left padding and the slowest batches
start first. Under `torchrun --nproc-per-node N` every process sees the same batches and takes every N-th one
(torch.distributed tells it which), so each file is done exactly once and a batch holds the same files whatever N
is: the outputs do not depend on the number of processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import soundfile as sf
import torch
import torch.distributed as dist
from torch import Tensor

from .audio import load_audio
from .errors import InputError, QwenAudioError

R = TypeVar("R")

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")  # what load_audio reads (libsndfile)


@dataclass(frozen=True)
class Job:
    path: Path  # the input file
    name: Path  # where its outputs go under the output directory, without the format's suffix


def find_inputs(paths: list[Path]) -> list[Job]:
    """Files as given, plus every audio file below each directory (its outputs keep the relative path). Two
    inputs that would write the same output are an error."""
    jobs: list[Job] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            jobs += [Job(p, p.relative_to(path).with_suffix("")) for p in found]
        else:
            jobs.append(Job(path, Path(path.stem)))
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.name in seen and seen[job.name] != job.path:
            raise InputError(f"{seen[job.name]} and {job.path} would both write outputs named {job.name}")
        seen[job.name] = job.path
    return list({job.path: job for job in jobs}.values())  # a file given twice is done once


def seconds(path: Path) -> float:
    """Length from the file's header (0 when unreadable: the error is reported when the file is loaded)."""
    try:
        return sf.info(str(path)).duration
    except Exception:  # noqa: BLE001 - libsndfile raises several kinds; all mean "cannot tell"
        return 0.0


def plan_batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Batches of files of similar length, longest first; equal lengths keep the input order. Every process
    plans the same batches from the same arguments."""
    ordered = sorted(jobs, key=lambda j: -seconds(j.path))  # stable
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def run_files(jobs: list[Job], recognize: Callable[[list[Tensor]], list[R]], write: Callable[[Job, R], None], *,
              batch_size: int = 8, rank: int = 0, world: int = 1,
              progress: Callable[[int, int, list[Job]], None] | None = None) -> dict:
    """Recognise `jobs` a batch at a time (this process's share of `plan_batches`) and `write` each result.

    A file that cannot be read fails alone; a batch whose recognition raises fails its files; the others go on.
    `progress(finished, total, batch)` is called after each batch. Returns this process's {"done", "failed"}, the
    failures as "path: message" lines (also logged on stderr)."""
    mine = plan_batches(jobs, batch_size)[rank::world]
    done, failed, total = 0, [], sum(len(b) for b in mine)
    for batch in mine:
        readable, clips = [], []
        for job in batch:
            try:
                clips.append(load_audio(job.path))
                readable.append(job)
            except QwenAudioError as e:
                failed.append(_report(job.path, e))
        try:
            results = recognize(clips) if clips else []
        except QwenAudioError as e:  # the batch as a whole failed: every file in it did
            failed += [_report(job.path, e) for job in readable]
            results, readable = [], []
        for job, result in zip(readable, results):
            write(job, result)
        done += len(readable)
        if progress:
            progress(done + len(failed), total, batch)
    return {"done": done, "failed": failed}


def _report(path: Path, error: Exception) -> str:
    """`error: path: message` on stderr, without repeating the path that library messages often start with; the
    line is returned for the summary."""
    line = f"{path}: {str(error).removeprefix(f'{path}: ')}"
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


def gather(obj: object, world: int) -> list[object]:
    """Every process's `obj`, in rank order (just [obj] in a single process)."""
    if world == 1:
        return [obj]
    out: list[object] = [None] * world
    dist.all_gather_object(out, obj)
    return out
