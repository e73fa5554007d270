"""The held-out examples' loss during a run and, with `eval_task`, the official scores of greedy replies to them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import evaluation
from ..core.errors import InputError
from ..core.model import QwenAudio
from ..core.tokenizer import LANGUAGES
from ..runner import Processes
from .config import TrainConfig
from .data import Example, as_examples, batch_inputs, label_count, length_keys, load_clip
from .step import autocast


def validate(engine: nn.Module, model: QwenAudio, examples: Sequence[Example], config: TrainConfig,
             processes: Processes) -> dict[str, Any]:
    """`eval_loss`, the official loss over all of `examples` (token-weighted, as a training step's), and with
    `eval_task` each score of the greedy replies, `eval_<score>`. In eval mode: no dropout, and the model as
    inference runs it. Each process takes its share of the batches (`Processes.share`)."""
    lengths = length_keys(examples)
    ordered = sorted(range(len(examples)), key=lengths.__getitem__)
    batches = [[examples[i] for i in ordered[k : k + config.batch_size]]
               for k in range(0, len(ordered), config.batch_size)]
    mine = processes.share(batches)
    # Sharded, every process gathers each block's weights together: all take as many passes, weightless if need be.
    sharded = config.shard and processes.world > 1
    passes = mine + batches[: -(-len(batches) // processes.world) - len(mine)] if sharded else mine
    loss_of = engine if sharded else model.loss  # DDP's forward belongs to training
    model.eval()
    try:
        total, tokens = 0.0, 0
        with torch.no_grad():
            for k, batch in enumerate(passes):
                ids, labels, mask, clips = batch_inputs(model, batch)
                count = label_count(labels) if k < len(mine) else 0
                with autocast(model, config):
                    total += loss_of(ids, labels, mask, clips).item() * count
                tokens += count
        total, tokens = processes.sum(torch.tensor([total, float(tokens)], dtype=torch.float64)).tolist()
        result: dict[str, Any] = {"eval_loss": total / tokens, "eval_tokens": int(tokens)}
        if config.eval_task:
            result |= _reply_scores(model, mine, config.eval_task, processes)
        return result
    finally:
        model.train()


def reply_languages(examples: Sequence[Example], task: str) -> list[str | None]:
    """The language each example's reply is scored in as `task` (the spoken one of an ASR or SRWT prompt, the
    target of a translation; None where the task's score needs none). Only task-form examples have one prompt to
    reply to; anything else is refused, naming the line."""
    examples = as_examples(examples, "examples", empty=True)
    if task not in evaluation.BENCHMARKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(evaluation.BENCHMARKS)}")
    languages: list[str | None] = []
    for example in examples:
        if example.turns:
            raise InputError(f"{example.where}: replies are scored for task-form examples; this is a conversation")
        named = [tag for tag in re.findall(r"<\|(\w+)\|>", example.prompt) if tag in LANGUAGES]
        if task not in ("asr", "srwt", "st"):
            languages.append(None)
        elif not named:
            raise InputError(f"{example.where}: {task} scores in the prompt's language, and it names none")
        elif task == "st":
            languages.append(named[-1])
        else:
            try:
                languages.append(evaluation.scored_language(task, named[0]))
            except InputError as e:
                raise InputError(f"{example.where}: {e}") from None
    return languages


def _reply_scores(model: QwenAudio, batches: list[list[Example]], task: str, processes: Processes) -> dict[str, Any]:
    """Greedy replies to this process's `batches` with the official evaluation's decoding, scored over every
    process's replies as `evaluation.source_scores` scores one source."""
    records = []
    for batch in batches:
        clips = [[load_clip(p, model.encoder.min_samples) for p in e.audio] for e in batch]
        replies = evaluation.generate_replies(model, [e.prompt for e in batch], clips,
                                              evaluation.BENCHMARKS[task].max_new_tokens)
        for e, reply, language in zip(batch, replies, reply_languages(batch, task)):
            source = Path(e.where.rsplit(":", 1)[0]).stem  # the data file's name, as a source's in evaluation
            records.append({"reference": e.response, "reply": reply, "language": language, "source": source})
    everyone = [record for part in processes.gather(records) for record in part]
    scores, notes = evaluation.source_scores(task, everyone)
    return {**{f"eval_{name}": value for name, value in scores.items()}, **({"eval_notes": notes} if notes else {})}
