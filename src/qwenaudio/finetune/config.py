"""A fine-tuning run's settings (`TrainConfig`, checked when made), what each setting trains, the learning-rate
schedule, and the policy on the weights a run starts from (quantized weights, the dtype to load them in)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import evaluation
from ..core.checkpoint import QUANTIZATIONS
from ..core.checks import expect, finite, whole
from ..core.errors import InputError
from ..core.families import QWEN2_AUDIO, QWEN_AUDIO
from ..core.model import QwenAudio
from ..lora import LoraConfig


PARTS = ("decoder", "encoder", "projection", "all")  # what full fine-tuning trains; the rest stays frozen
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """A fine-tuning run's settings; the defaults suit a small full fine-tune."""

    steps: int = 100  # optimizer steps
    batch_size: int = 4  # examples per forward pass
    accumulate: int = 1  # forward passes per optimizer step
    lr: float = 1e-5  # peak learning rate: linear warmup to it, then cosine to 0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm (0: off)
    seed: int = 0  # the data order
    part: str = "decoder"  # one of PARTS
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end (and on an interrupt)
    # minutes of wall time between checkpoints (0: off), so a kill loses at most this much: process 0's clock decides
    # for every process, since a checkpoint gathers from all of them
    save_minutes: float = 10.0
    activation_checkpointing: bool = True
    lora: LoraConfig | None = None  # train a LoRA adapter (everything else frozen) instead of `part`
    # "bf16": the forward under bf16 autocast, weights, gradients and AdamW state kept in fp32; "auto": bf16 on GPUs
    # that run it, fp32 elsewhere (on CPUs bf16 is fast only with AVX-512 BF16, and exact fp32 is what tests compare)
    precision: str = "auto"
    shard: bool = False  # under torchrun, FSDP: weights, gradients and AdamW state split over the processes
    eval_every: int = 0  # steps between evaluations of the eval examples; 0: with each checkpoint
    eval_task: str | None = None  # also score greedy replies to the eval examples by this task's official metrics

    def __post_init__(self) -> None:
        for ok, message in _train_rules(self):
            if not ok:
                raise InputError(message)
        if self.part not in PARTS:
            raise InputError(f"part must be one of {', '.join(PARTS)}, got {self.part!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_task is not None and self.eval_task not in evaluation.BENCHMARKS:
            raise InputError(f"unknown eval task {self.eval_task!r}; choose from {', '.join(evaluation.BENCHMARKS)}")
        if self.shard and self.lora:
            raise InputError("shard (--fsdp) splits full fine-tuning's weights over the processes; a LoRA adapter is "
                             "small enough to train data-parallel: leave it off")
        if self.shard and self.eval_task:
            raise InputError("eval_task (--eval-task) with shard (--fsdp): a sharded model computes only with every "
                             "process in step, and each process's replies end at their own length; score the result "
                             "with `qwenaudio evaluate` instead (eval_loss is still computed)")


MAX_STEPS = 10**9  # far past any run (a billion steps), and a bound the schedule and the data order can count to
MAX_BATCH = 10**6  # examples a pass (or passes a step) that could ever fit in memory (or finish)
SEED_LIMIT = 2**63  # torch.Generator takes seeds below 2**64; each epoch draws from seed + epoch


def _train_rules(c: TrainConfig) -> list[tuple[bool, str]]:
    """(holds, message) for each number and switch of a TrainConfig, checked before anything loads: a value torch
    would fail on after minutes of loading, or train on silently (a negative clip norm, an infinite rate)."""
    return [
        (whole(c.steps, 1, MAX_STEPS), f"steps must be an int in 1..{MAX_STEPS:,}, got {c.steps!r}"),
        (whole(c.batch_size, 1, MAX_BATCH), f"batch_size must be an int in 1..{MAX_BATCH:,}, got {c.batch_size!r}"),
        (whole(c.accumulate, 1, MAX_BATCH), f"accumulate must be an int in 1..{MAX_BATCH:,}, got {c.accumulate!r}"),
        (finite(c.lr) and c.lr > 0, f"lr must be a finite number > 0, got {c.lr!r}"),
        (whole(c.warmup_steps, 0, MAX_STEPS), f"warmup_steps must be an int in 0..{MAX_STEPS:,}, got "
                                              f"{c.warmup_steps!r}"),
        (finite(c.weight_decay) and c.weight_decay >= 0,
         f"weight_decay must be a finite number >= 0, got {c.weight_decay!r}"),
        (finite(c.max_grad_norm) and c.max_grad_norm >= 0,
         f"max_grad_norm must be a finite number >= 0 (0: no clipping), got {c.max_grad_norm!r}"),
        (whole(c.seed, 0, SEED_LIMIT - 1), f"seed must be an int in 0..2**63-1, got {c.seed!r}"),
        (whole(c.save_every, 0, MAX_STEPS), f"save_every must be an int in 0..{MAX_STEPS:,} (0: at the end), got "
                                            f"{c.save_every!r}"),
        (finite(c.save_minutes) and c.save_minutes >= 0,
         f"save_minutes must be a finite number >= 0 (0: off), got {c.save_minutes!r}"),
        (whole(c.eval_every, 0, MAX_STEPS), f"eval_every must be an int in 0..{MAX_STEPS:,} (0: with each "
                                            f"checkpoint), got {c.eval_every!r}"),
        (isinstance(c.activation_checkpointing, bool),
         f"activation_checkpointing must be True or False, got {c.activation_checkpointing!r}"),
        (isinstance(c.shard, bool), f"shard must be True or False, got {c.shard!r}"),
        (c.lora is None or isinstance(c.lora, LoraConfig), f"lora must be a lora.LoraConfig or None, got {c.lora!r}"),
        (isinstance(c.part, str) and isinstance(c.precision, str) and isinstance(c.eval_task, (str, type(None))),
         "part, precision and eval_task must be names (strings)"),
    ]


# Settings a resumed run may change: they do not change what is learned.
RESUMABLE_CHANGES = ("steps", "save_every", "save_minutes", "shard", "eval_every", "eval_task")


# The encoder's output side, which maps Whisper's features into the decoder's space (`part="projection"`), by
# attribute path: Qwen-Audio's ln_post, proj and BOS/EOS rows; Qwen2-Audio's final layer norm and projector.
PROJECTION = {QWEN_AUDIO: ("ln_post.", "proj.", "audio_bos_eos_token."),
              QWEN2_AUDIO: ("audio_tower.layer_norm.", "multi_modal_projector.")}


def trainable(model: QwenAudio, part: str) -> dict[str, nn.Parameter]:
    """The parameters `part` trains, by official tensor name; every other parameter is frozen. `projection` is the
    audio encoder's output side (`PROJECTION`)."""
    expect(model, QwenAudio, "model", "a QwenAudio model (qwenaudio.load)")
    if part not in PARTS:
        raise InputError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    chosen: dict[str, nn.Parameter] = {}
    for owner in ("encoder", "decoder"):
        for path, param in getattr(model, owner).named_parameters():
            train = part in ("all", owner) or (part == "projection" and owner == "encoder" and path.startswith(
                PROJECTION[model.family]))
            param.requires_grad_(train)
            if train:
                chosen[model.family.official_name(owner, path)] = param
    return chosen


def schedule(step: int, config: TrainConfig) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based): linear warmup, then cosine decay to 0."""
    expect(step, int, "step", "an int (0-based optimizer step)")
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------- the weights a run starts from

def check_quantization(config: TrainConfig, quantize: str | None) -> None:
    """InputError unless `config` can train over weights quantized as `quantize` ("int8", "int4" or None): int8
    weights cannot take an update, so only a LoRA adapter trains over them; int4 layers have no backward at all.
    The messages name the command's options, so `qwenaudio finetune` says exactly what it always said."""
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    if quantize not in (None, *QUANTIZATIONS):
        raise InputError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None, got {quantize!r}")
    if quantize == "int4":
        raise InputError("int4 layers run inference only; train a LoRA adapter over --int8")
    if quantize == "int8" and config.lora is None:
        raise InputError("int8 weights cannot be fine-tuned in full; add --lora-rank to train an adapter")


def weights_dtype(config: TrainConfig, dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    """The dtype to load the model in for `config`: `dtype` when given; else float32 for full fine-tuning, since
    AdamW's small updates are lost in bf16 weights; else (LoRA, whose own weights are fp32 anyway) None, the
    loader's default."""
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    return dtype if dtype or config.lora else "float32"
