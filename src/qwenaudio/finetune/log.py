"""A run's record of each step: `metrics.jsonl` and, when tensorboard is installed, TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..core.files import append_line, write_text
from .checkpoints import output_errors


class MetricsLog:
    """Each step's record as a line of `metrics.jsonl` and, when tensorboard is installed, as scalars in
    `tensorboard/` (train/loss, train/lr, …, eval/loss, eval/wer, …). Steps after `done`, which a resumed run takes
    again, are dropped from both first (and any line that is not one of our records: a line cut off by a crash)."""

    def __init__(self, output_dir: Path, done: int):
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            with output_errors(self.path):
                kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if _step_of(line) <= done]
                write_text(self.path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.board = None
        else:
            self.board = SummaryWriter(str(output_dir / "tensorboard"), purge_step=done + 1)

    def write(self, record: dict[str, Any]) -> None:
        with output_errors(self.path), open(self.path, "a", encoding="utf-8") as f:
            append_line(f, record)
        if self.board:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    name = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                    self.board.add_scalar(name, value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board:
            self.board.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl record; infinity for a line that is not one (never kept)."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else math.inf
