"""One optimizer step's gradients over this process's batches (summed over the processes, `Processes.sum`, so every
process stays in step), and the signals that wait for an update to be whole."""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .. import parallel
from ..core.errors import TrainingError
from ..core.model import QwenAudio
from ..runner import Processes
from .checkpoints import checkpoint_dir
from .config import TrainConfig
from .data import Example, batch_inputs, label_count


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C or SIGTERM during the block takes effect when the block ends, so what it does is done whole; a second
    signal takes effect at once. Outside the main thread (where no handler can be set) the block runs as it is."""
    received: list[int] = []
    previous = {kind: signal.getsignal(kind) for kind in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for kind, handler in previous.items():
            signal.signal(kind, handler)

    def defer(signum: int, _frame) -> None:
        received.append(signum)
        if len(received) > 1:
            restore()
            signal.raise_signal(signum)

    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield  # no handler can be set here, or one set outside Python could not be put back
        return
    for kind in previous:
        signal.signal(kind, defer)
    try:
        yield
    finally:
        restore()
    if received:
        signal.raise_signal(received[0])


def autocast(model: QwenAudio, config: TrainConfig) -> torch.autocast:
    device = model.device
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def compute_gradients(engine: nn.Module, model: QwenAudio, batches: list[list[Example]],
                      params: dict[str, nn.Parameter], optimizer, config: TrainConfig, step: int, output_dir: Path,
                      processes: Processes) -> tuple[float, int]:
    """The gradients of one optimizer step over this process's `batches` (of the step's `accumulate` × world),
    clipped, for `train` to apply; returns the step's loss, token-weighted over every process's batches, and their
    label tokens. Each batch's loss is weighted by its
    share of all the step's label tokens (times world, as the engine averages over the processes), so every
    process takes the step one process would take on all the batches."""
    optimizer.zero_grad(set_to_none=True)
    prepared = [batch_inputs(model, batch) for batch in batches]
    counts = [label_count(labels) for _, labels, _, _ in prepared]
    total = int(processes.sum(torch.tensor([float(sum(counts))])))
    value, bad = 0.0, []
    for k, (batch, inputs, count) in enumerate(zip(batches, prepared, counts)):
        with parallel.syncing(engine, k == len(prepared) - 1):
            with autocast(model, config):
                loss = engine(*inputs)
            if not torch.isfinite(loss):
                bad.append(f"{', '.join(e.where for e in batch)}: loss {loss.item()}")
            # backward even so: every process must take part in each gradient exchange; nothing is applied below
            (loss * (count * processes.world / total)).backward()
        value += loss.item() * count / total
    value, failures = processes.sum(torch.tensor([value, float(len(bad))], dtype=torch.float64)).tolist()
    if failures:
        where = "; ".join(bad) or "in another process"
        raise TrainingError(f"step {step + 1}: the loss is not finite (batch {where}); {_kept(output_dir)}")
    # the norm is needed even unclipped (max_norm inf scales by exactly 1): an overflowed norm made clipping scale
    # every gradient by 0, a step that silently changed nothing
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm or math.inf)
    if processes.sum(torch.tensor([float(not torch.isfinite(norm))])).item():
        raise TrainingError(f"step {step + 1}: the gradients are not finite (norm {norm.item()}; a learning rate or "
                            f"LoRA alpha too large?); {_kept(output_dir)}")
    return value, total


def _kept(output_dir: Path) -> str:
    """What a step stopped before its update leaves: the last checkpoint, if one was saved."""
    checkpoint = checkpoint_dir(output_dir)
    kept = f"the last checkpoint in {checkpoint} is kept" if checkpoint.is_dir() else "no checkpoint was saved yet"
    return f"nothing was updated and {kept}"

