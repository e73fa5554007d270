"""Progress on stderr, one way for every long job (files transcribed, examples evaluated, steps trained, weights
loaded).

A line starts with `rank K: ` when several processes share the job, then, on a terminal only, a bar (logs and CI
get plain lines that a script can parse), then `k/N` and what the job adds: the batch's files, or the rate and the
time left (`eta`, as `m:ss`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


def bar(done: int, total: int, width: int = 20) -> str:
    """`[#####     ] ` on a terminal; "" elsewhere."""
    return f"[{'#' * (width * done // max(total, 1)):<{width}}] " if sys.stderr.isatty() else ""


def eta(seconds: float) -> str:
    """The time left as `m:ss` (whole seconds; minutes past 59 stay minutes)."""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def pace(done: int, total: int, seconds: float) -> str:
    """`2.30/s, ETA 0:26`: done per second so far, and the time left at that rate."""
    per_second = done / seconds if seconds > 0 else 0.0
    left = (total - done) / per_second if per_second > 0 else 0.0
    return f"{per_second:.2f}/s, ETA {eta(left)}"


def who(rank: int, world: int) -> str:
    """`rank K: ` in front of every line a process prints when several run; "" alone."""
    return f"rank {rank}: " if world > 1 else ""


def say(line: str, end: str = "\n") -> None:
    print(line, end=end, file=sys.stderr, flush=True)


def loading(done: int, total: int) -> None:
    """Weights loaded so far (`load_model`'s progress): a one-line bar on a terminal; elsewhere (logs, CI) only the
    final count."""
    if sys.stderr.isatty():
        say(f"\rloading weights {bar(done, total, 30)}{done}/{total}", end="\n" if done == total else "")
    elif done == total:
        say(f"loaded {total} weight tensors")


@dataclass(frozen=True)
class Progress:
    """One process's (`rank` of `world`) progress through its share of a job, a line after each step: `[k/N]
    detail` (`count`: which files a batch held) or `k/N unit, rate/s, ETA m:ss` (`rate`), each behind the rank's
    prefix and, on a terminal, a bar; `line` says anything else behind the prefix (a batch still decoding)."""

    unit: str
    rank: int = 0
    world: int = 1

    def count(self, done: int, total: int, detail: str) -> None:
        say(f"{who(self.rank, self.world)}{bar(done, total)}[{done}/{total}] {detail}")

    def rate(self, done: int, total: int, seconds: float) -> None:
        say(f"{who(self.rank, self.world)}{bar(done, total)}{done}/{total} {self.unit}, {pace(done, total, seconds)}")

    def line(self, detail: str) -> None:
        say(f"{who(self.rank, self.world)}{detail}")
