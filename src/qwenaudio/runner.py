"""Jobs over many inputs, shared between processes: the one protocol `qwenaudio transcribe` and `evaluate` follow.

Under `torchrun --nproc-per-node N` every process plans the same jobs (the caller leaves out those done already:
resuming is the caller's rule, kept in its output directory), checks that the others planned the same, runs its share
of `batch.plan_batches` (`batch.run_files`), and process 0 writes the summary from every process's `Report`. Ctrl-C,
and SIGTERM taken as KeyboardInterrupt, stop the run: process 0 still writes the summary (from its own report, since
the others may be gone), then the interrupt goes on, so the command exits as interrupted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .batch import run_files
from .core.errors import InputError
from .progress import Progress

J = TypeVar("J")  # a batch.Job, or anything with its `path` and `label` (an evaluation Example)
R = TypeVar("R")  # what recognize returns for one job
S = TypeVar("S")  # what the summary callback returns


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


@dataclass
class Report:
    """What one process did: the jobs done (by label) and a `label: message` line for each that failed."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Processes:
    """This process (`rank`) among the `world` that share a run; made once per command (`join`)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def join(cls, device: str | None) -> Processes:
        """Join torchrun's process group where started under torchrun (`process_group`); else one process."""
        return cls(*process_group(device))

    @classmethod
    def current(cls) -> Processes:
        """This process's place in the process group already joined (by `join`, or by a library caller's own
        `init_process_group`); one process when none is."""
        return cls(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else cls()

    def gather(self, obj: object) -> list[object]:
        return gather(obj, self.world)

    def share(self, items: Sequence[J]) -> Sequence[J]:
        """This process's share of `items`, which every process holds in the same order: every world-th from its
        rank, so each item is taken by exactly one process."""
        return items[self.rank :: self.world]

    def sum(self, values: Tensor) -> Tensor:
        """`values` summed over the processes (unchanged in a single process); nccl sums only on the GPU."""
        if self.world > 1:
            nccl = dist.get_backend() == "nccl"
            on = values.to(torch.device("cuda", torch.cuda.current_device()) if nccl else values.device)
            dist.all_reduce(on)
            values = on.to(values.device)
        return values

    def progress(self, unit: str) -> Progress:
        return Progress(unit, self.rank, self.world)

    def run(self, todo: Sequence[J], recognize: Callable[[list[J], list[Tensor]], list[R]],
            write: Callable[[J, R], None], summarize: Callable[[list[Report], bool], S], *, min_samples: int,
            batch_size: int = 8, progress: Callable[[int, int, list[J]], None] | None = None,
            finished: Callable[[J, str | None], None] | None = None,
            different: str = "the processes found different jobs to do") -> tuple[S | None, list[Report]]:
        """Run this process's share of `todo` (`batch.run_files` with `recognize`, `write` and `progress`),
        calling `finished(job, error or None)` as each job ends; then process 0 calls `summarize(reports,
        interrupted)` with every process's `Report`. Returns (what `summarize` returned, or None in the other
        processes; the reports). Refuses (InputError `different`) when the processes planned different numbers of
        jobs. After Ctrl-C or SIGTERM (a KeyboardInterrupt), `summarize` gets this process's report alone, and the
        interrupt is raised again."""
        if len(set(self.gather(len(todo)))) > 1:  # also a barrier: every process plans before any writes
            raise InputError(different)
        report, interrupted = Report(), None
        try:
            for job, error in run_files(todo, recognize, write, min_samples=min_samples, batch_size=batch_size,
                                        rank=self.rank, world=self.world, progress=progress):
                (report.failed.append(error) if error else report.done.append(job.label))
                if finished:
                    finished(job, error)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: summarize, then let the same signal go on
            interrupted = e
        reports = [report] if interrupted else self.gather(report)
        summary = summarize(reports, interrupted is not None) if self.rank == 0 else None
        if interrupted:
            raise interrupted
        return summary, reports
