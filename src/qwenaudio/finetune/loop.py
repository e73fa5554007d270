"""`train`: the fine-tuning loop, a step at a time, with its checkpoints, evaluations and records."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import parallel
from ..core.checkpoint import quantization_of
from ..core.checks import expect
from ..core.errors import InputError, OutputError
from ..core.families import QWEN_AUDIO
from ..core.model import QwenAudio
from ..lora import apply_lora, lora_parameters
from ..runner import Processes
from .checkpoints import check_resume, checkpoint_dir, restore_run, rng_state, run_inputs, save_run, weights_of
from .config import TrainConfig, check_quantization, schedule, trainable
from .data import Example, as_examples, plan_order
from .log import MetricsLog
from .step import compute_gradients, deferred_interrupts
from .validation import reply_languages, validate


def train(model: QwenAudio, examples: Sequence[Example], output_dir: str | Path, config: TrainConfig = TrainConfig(),
          *, eval_examples: Sequence[Example] = (), resume: bool = False,
          progress: Callable[[dict[str, Any]], None] | None = None, inputs: Mapping[str, str] | None = None,
          saved: Callable[[int], None] | None = None) -> list[float]:
    """Fine-tune `model` in place on `examples` with AdamW and the official loss (the parameters of `config.part`,
    or a LoRA adapter with `config.lora`; `export` writes either at the end); returns every step's loss.

    With `accumulate` > 1 the forward passes of a step are weighted by their label tokens, so a step's loss and
    gradients are those of one batch of all its examples. Under torchrun each process takes every world-th batch
    of a step and `parallel.wrap` averages the gradients (DistributedDataParallel, or FSDP with `shard`, after
    which the model's parameters stay sharded: `save_model` gathers them), so N processes take the steps one
    process would take with `accumulate` × N.

    Every `save_every` steps, every `save_minutes` of wall time, at the end and on Ctrl-C or SIGTERM
    (KeyboardInterrupt), the trained parameters, the optimizer, the schedule, torch's random state, the losses and
    what the run depends on (`run_inputs`, plus `inputs`) go to `output_dir/checkpoint` (built aside and renamed, so
    the last one written is always whole); `saved(step)` is called after each. An update is taken whole or not at
    all (a signal during it acts once it is done), and an interrupt saves the last whole step, so `resume`
    continues with the same data order to the same losses and weights as a run never stopped. A signal while a
    checkpoint is written lets it finish; a second one abandons it, the previous checkpoint kept. Sharded over
    several processes (`shard`), an interrupt saves nothing (gathering needs every process in step; the last
    checkpoint stays); data-parallel, process 0 saves its whole copy alone. A new run seeds torch's generator with
    `seed` (LoRA's initial weights, dropout). Each step appends a record to `output_dir/metrics.jsonl` (and to
    TensorBoard's `output_dir/tensorboard` when tensorboard is installed), with `eval_loss` (and `eval_task`'s
    scores) over `eval_examples` every `eval_every` steps. A loss that is not finite stops the run with
    TrainingError before the update, and trained weights that are not finite are never written, the last
    checkpoint kept; a checkpoint or log that cannot be written (a full disk) is OutputError. Weights it cannot
    update (int8 without a LoRA adapter, int4: `check_quantization`) are refused before anything is written."""
    examples, eval_examples, inputs = _checked(model, examples, output_dir, config, eval_examples=eval_examples,
                                               resume=resume, progress=progress, inputs=inputs, saved=saved)
    output_dir, processes = Path(output_dir), Processes.current()
    checkpoint = checkpoint_dir(output_dir)
    previous = check_resume(checkpoint, config, inputs)["losses"] if resume else None
    _make(output_dir)
    engine, params = _trained(model, config, resume, processes.world)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, config))
    losses = restore_run(checkpoint, params, optimizer, scheduler, config, previous) if resume else []
    log = MetricsLog(output_dir, done=len(losses)) if processes.rank == 0 else None  # all know the same; one writes
    per_step = config.accumulate * processes.world
    order = plan_order(examples, config)
    for _ in range(len(losses) * per_step):  # the batches already learned from
        next(order)
    every = config.eval_every or config.save_every
    saves = _Saves(checkpoint, params, optimizer, scheduler, config, inputs, processes, saved,
                   on_disk=len(losses) if resume else None, last=time.monotonic())
    started, logged, record = saves.last, len(losses), None  # the last step in metrics.jsonl; its record
    rng = rng_state(model)  # torch's random state at the start of the next step: what a resume restores
    try:
        for step in range(len(losses), config.steps):
            batches = processes.share([[examples[i] for i in next(order)] for _ in range(per_step)])
            loss, tokens = compute_gradients(engine, model, batches, params, optimizer, config, step, output_dir,
                                             processes)
            done = step + 1
            with deferred_interrupts():  # the update, the schedule and the record move together, or not at all
                record = {"step": done, "loss": loss, "lr": optimizer.param_groups[0]["lr"],  # this update's rate
                          "tokens": tokens, "seconds": time.monotonic() - started}
                optimizer.step()
                scheduler.step()
                losses.append(loss)
                rng = rng_state(model)
            if eval_examples and (done == config.steps or every and done % every == 0):
                record |= validate(engine, model, eval_examples, config, processes)
            if log:
                log.write(record)
                logged = done
                if progress:
                    progress(record)
            if saves.due(done):
                saves.save(losses, rng)
    except KeyboardInterrupt:
        if log and record and logged != len(losses):
            log.write(record)  # interrupted before it was logged (while evaluating): logged without the eval scores
        saves.interrupted(losses, rng)
        raise
    finally:
        if log:
            log.close()
    if processes.world > 1:
        dist.barrier()  # the last checkpoint is written before any process returns
    return losses


def _checked(model: QwenAudio, examples: Sequence[Example], output_dir: str | Path, config: TrainConfig, *,
             eval_examples: Sequence[Example], resume: bool, progress: Callable | None, inputs: Mapping | None,
             saved: Callable | None) -> tuple[list[Example], list[Example], dict[str, str]]:
    """`train`'s arguments checked before anything is written: the examples (and that `eval_task` can score the
    held-out ones), the weights `config` may train, the callbacks; and what the run depends on (`run_inputs` of the
    examples and the model's weights, plus `inputs`)."""
    expect(model, QwenAudio, "model", "a QwenAudio model (qwenaudio.load)")
    examples = as_examples(examples, "examples")
    eval_examples = as_examples(eval_examples, "eval_examples", empty=True)
    expect(output_dir, (str, Path), "output_dir", "a directory path")
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    check_quantization(config, quantization_of(model.decoder))
    expect(resume, bool, "resume", "True or False")
    for name, function in (("progress", progress), ("saved", saved)):
        if function is not None and not callable(function):
            raise InputError(f"{name} must be a function or None, got {function!r:.80}")
    expect(inputs, (Mapping, type(None)), "inputs", "a mapping of input names to digests, or None")
    inputs = {**run_inputs(examples, eval_examples, weights=weights_of(model)), **dict(inputs or {})}
    if config.eval_task and model.family is not QWEN_AUDIO:
        raise InputError(f"eval_task (--eval-task) scores replies by Qwen-Audio's benchmarks, and the model is "
                         f"{model.family.name}: export the fine-tuned model and run `qwenaudio evaluate` on it")
    if config.eval_task:
        reply_languages(eval_examples, config.eval_task)  # refuse what cannot be scored before training
    return examples, eval_examples, inputs


def _make(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{output_dir}: cannot make the output directory ({e.strerror or e})") from None


@dataclass
class _Saves:
    """When the run's checkpoint is written and what it then holds: at the last step, every `save_every` steps and
    every `save_minutes` (`save`), and on an interrupt the last whole step (`interrupted`). Process 0 writes;
    `saved(step)` is told after each."""

    checkpoint: Path
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    inputs: dict[str, str]
    processes: Processes
    saved: Callable[[int], None] | None
    on_disk: int | None  # the step the checkpoint holds
    last: float  # when it was written (time.monotonic)
    writing: bool = False  # a save under way

    def due(self, done: int) -> bool:
        config = self.config
        return done == config.steps or bool(config.save_every and done % config.save_every == 0) or _due(
            self.last, config, self.processes)

    def save(self, losses: list[float], rng: dict[str, Tensor]) -> None:
        """The checkpoint of step `len(losses)`; Ctrl-C lets it finish, a second one abandons it."""
        self.writing = True
        with deferred_interrupts():
            self._write(losses, rng)
        self.on_disk, self.writing, self.last = len(losses), False, time.monotonic()

    def interrupted(self, losses: list[float], rng: dict[str, Tensor]) -> None:
        """The last whole step (the step under way, if any, is done again after the resume), unless a checkpoint
        was being written when the signal came, holds it already, or is sharded (gathering needs every process in
        step)."""
        if not self.writing and self.on_disk != len(losses) and not (self.config.shard and self.processes.world > 1):
            self._write(losses, rng)

    def _write(self, losses: list[float], rng: dict[str, Tensor]) -> None:
        save_run(self.checkpoint, self.params, self.optimizer, self.scheduler, losses, self.config, rng, self.inputs,
                 write=self.processes.rank == 0)
        if self.saved and self.processes.rank == 0:
            self.saved(len(losses))


def _due(last: float, config: TrainConfig, processes: Processes) -> bool:
    """Whether `save_minutes` have passed since the last checkpoint, by process 0's clock for every process (each
    process's own clock could disagree, and a checkpoint gathers from all of them)."""
    late = bool(config.save_minutes) and time.monotonic() - last >= 60 * config.save_minutes
    if processes.world == 1:
        return late
    return bool(processes.sum(torch.tensor([float(late and processes.rank == 0)])).item())


def _trained(model: QwenAudio, config: TrainConfig, resume: bool, world: int
             ) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The model in training mode, wrapped for `world` processes (`parallel.wrap`: what runs the forward), and the
    parameters the run trains by name: `config.part`, everything else frozen, or a LoRA adapter (added unless the
    model already holds one, resumed or trained before)."""
    model.train()
    model.decoder.activation_checkpointing = model.encoder.activation_checkpointing = config.activation_checkpointing
    if not resume:  # LoRA's initial A and its dropout draw from torch's generator; a resumed run restores it
        torch.manual_seed(config.seed)
    if config.lora is None:
        trainable(model, config.part)
    elif not lora_parameters(model):  # a model resumed or trained before already holds its adapter
        apply_lora(model, config.lora)
    engine = parallel.wrap(model, world, config.shard)
    # taken after wrapping: FSDP replaces each parameter with its shard
    return engine, trainable(model, config.part) if config.lora is None else lora_parameters(model)
