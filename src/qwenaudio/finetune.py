"""Fine-tuning data: JSON Lines files of examples turned into token ids and labels for `QwenAudio.loss`.

Three forms are read, one example a line, audio paths relative to the file:
- task form, for the base model: `{"audio": "a.flac", "prompt": "<|startoftranscript|>…<|wo_itn|>", "response": "…"}`,
  or `"task": "asr"` (and `"language"`, or a `source` naming the dataset, …) instead of the prompt, to use the
  official evaluation's tags for one of `evaluation.TASKS`; the official evaluation files' `{"audio", "gt", …}`
  rows also work when the task is given for the whole file. The model reads `<audio>PATH</audio>` + prompt and
  learns the response and the `<|endoftext|>` after it;
- chat form, for Qwen-Audio-Chat: `{"messages": [{"role": "user", "content": [{"audio": "a.wav"}, {"text": "…"}]},
  {"role": "assistant", "content": "…"}, …]}` (an optional first `system` message), rendered as the official
  ChatML context (chat.py's pieces, `Audio 1:` labels per turn); the model learns each assistant reply and its
  `<|im_end|>`, nothing else;
- ms-swift's form: `{"messages": [{"role": "user", "content": "<audio>what is said?"}, …], "audios": ["a.wav"]}`,
  each `<audio>` placeholder taking the next path of `audios`; read as the chat form.

Every line is checked when the file is read (JSON, fields, turns in order, clips that exist, are readable and last
at most 30 s, non-empty replies), so a bad line is named by file and line before any training starts. Token ids
are made when a batch is put together, from the clips as loaded (a clip's span depends on its exact length).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import evaluation, parallel, scoring
from .batch import gather, seconds
from .chat import DEFAULT_SYSTEM, content_ids, query_text
from .core.audio import CHUNK_LENGTH, audio_span, load_audio
from .core.checkpoint import INDEX_FILE, official_name, save_checkpoint
from .core.errors import InputError, TrainingError
from .core.files import building, write_text
from .core.model import IGNORE_INDEX, QwenAudio
from .core.tokenizer import AUDIO_SPECIAL_TOKENS, LANGUAGES, Tokenizer
from .lora import LoraConfig, apply_lora, lora_parameters

Turn = tuple[str, str]  # (user text with Audio n:<audio>path</audio> regions, assistant reply)


@dataclass(frozen=True)
class Example:
    """One checked line: a task-form prompt and response, or a conversation."""

    where: str  # "train.jsonl:3"
    audio: tuple[Path, ...]  # the clips, in the order of their <audio> regions
    prompt: str = ""  # task form: what the model reads, <audio>PATH</audio> and the tags
    response: str = ""  # task form: what it learns (then <|endoftext|>)
    system: str = DEFAULT_SYSTEM  # chat form
    turns: tuple[Turn, ...] = ()  # chat form


def read_examples(path: str | Path, *, task: str | None = None, language: str | None = None
                  ) -> tuple[list[Example], list[str]]:
    """The examples of a JSON Lines file and one message per line that cannot be trained on, naming the file and
    line (blank lines are not examples). `task` reads rows without a prompt (the official evaluation files) as that
    task of `evaluation.TASKS`; `language` is the spoken language such rows need when they do not say it."""
    path = Path(path)
    if task is not None and task not in evaluation.TASKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(evaluation.TASKS)}")

    def parse(row: Any, _: int, where: str) -> Example:
        if not isinstance(row, dict):
            raise InputError(f"expected a JSON object, got {type(row).__name__}")
        example = _chat(row, where, path.parent) if "messages" in row else _task(row, where, path.parent, task,
                                                                                 language)
        for clip in example.audio:
            _check_clip(clip)
        return example

    return evaluation.read_lines(path, parse)


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise InputError(f"{name!r} must be a string, got {json.dumps(value, ensure_ascii=False)[:80]}")
    if not value.strip():
        raise InputError(f"{name!r} is empty: there is nothing to learn")
    return value


def _task(row: dict, where: str, root: Path, task: str | None, language: str | None) -> Example:
    if "audio" not in row:
        raise InputError(f"no 'audio' field: a task-form row has audio, prompt (or task) and response; a chat row "
                         f"has messages (fields here: {', '.join(sorted(row)) or 'none'})")
    audio = _text(row, "audio")
    if "prompt" in row:
        prompt = _text(row, "prompt")
    else:
        name = row.get("task", task)
        if name not in evaluation.TASKS:
            raise InputError(f"no 'prompt' field and no task (give 'task' in the row or for the file): one of "
                             f"{', '.join(evaluation.TASKS)}, got {name!r}")
        missing = [f for f in ("source",) * (name == "st") + evaluation.TASKS[name].fields if f not in row]
        if missing:
            raise InputError(f"task {name} needs the field(s) {', '.join(missing)} to build its prompt")
        speech = evaluation.spoken_language(row, language) if evaluation.TASKS[name].speech else None
        prompt = evaluation.prompt(name, row, speech, "clotho")
    response = _text(row, "response" if "response" in row or "gt" not in row else "gt")
    clip = _resolve(root, audio)
    return Example(where, (clip,), prompt=f"<audio>{clip}</audio>{prompt}", response=response)


def _chat(row: dict, where: str, root: Path) -> Example:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise InputError("'messages' must be a non-empty list of {role, content}")
    audios = row.get("audios")
    pending = list(audios) if isinstance(audios, list) else None  # ms-swift: <audio> placeholders take these
    system, turns, clips, user = DEFAULT_SYSTEM, [], [], None
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"message {k} must be {{'role': system|user|assistant, 'content': …}}, got "
                             f"{json.dumps(message, ensure_ascii=False)[:80]}")
        role, content = message["role"], message.get("content")
        if role == "system" and k == 0:
            system = _text(message, "content")
        elif role == "user" and user is None:
            parts = _swift_parts(content, pending, k) if pending is not None else content
            parts = [{"audio": str(_resolve(root, p["audio"]))} if isinstance(p, dict) and "audio" in p else p
                     for p in ([parts] if isinstance(parts, str) else parts or [])]
            user = query_text(parts)
            clips += [Path(p["audio"]) for p in parts if isinstance(p, dict) and "audio" in p]
        elif role == "assistant" and user is not None:
            turns.append((user, _text(message, "content")))
            user = None
        else:
            raise InputError(f"message {k} ({role}) is out of turn: a conversation is an optional system message, "
                             "then user and assistant messages taking turns, ending with the assistant")
    if user is not None or not turns:
        raise InputError("the conversation must end with an assistant message (its reply is what is learned)")
    if pending:
        raise InputError(f"'audios' has {len(pending)} more path(s) than the messages have <audio> placeholders")
    return Example(where, tuple(clips), system=system, turns=tuple(turns))


def _swift_parts(content: Any, pending: list, k: int) -> list:
    """ms-swift's `"<audio>what is said?"` with the next path of `audios` per placeholder, as chat parts."""
    if not isinstance(content, str):
        raise InputError(f"message {k}: with 'audios', content must be a string with <audio> placeholders")
    pieces = content.split("<audio>")
    if len(pieces) - 1 > len(pending):
        raise InputError(f"message {k} has {len(pieces) - 1} <audio> placeholder(s) but 'audios' has only "
                         f"{len(pending)} path(s) left")
    parts: list = [pieces[0]] if pieces[0] else []
    for text in pieces[1:]:
        parts.append({"audio": pending.pop(0)})
        if text:
            parts.append(text)
    return parts


def _resolve(root: Path, audio: Any) -> Path:
    if not isinstance(audio, str) or not audio:
        raise InputError(f"an audio path must be a non-empty string, got {audio!r}")
    path = Path(audio)
    return path if path.is_absolute() else root / path


def _check_clip(clip: Path) -> None:
    """Missing, unreadable and over-long clips are refused here: the model hears at most 30 s, and a longer clip
    would be learned from its first 30 s while its reply describes the whole."""
    if not clip.is_file():
        raise InputError(f"audio {clip}: no such file")
    try:
        seconds = sf.info(str(clip)).duration
    except Exception as e:  # noqa: BLE001 - libsndfile raises several kinds
        raise InputError(f"audio {clip}: cannot be read ({e})") from None
    if seconds > CHUNK_LENGTH:
        raise InputError(f"audio {clip} lasts {seconds:.1f} s; the model hears at most {CHUNK_LENGTH} s: cut it")


def encode(tokenizer: Tokenizer, example: Example, span_of: Callable[[str], int]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; labels are IGNORE_INDEX wherever nothing is to be learned. `span_of(path)`
    gives each clip's audio span (`audio_span` of its length)."""
    if example.turns:
        return _encode_chat(tokenizer, example, span_of)
    prompt = tokenizer.encode(example.prompt, audio_spans=[span_of(p) for p in tokenizer.audio_paths(example.prompt)])
    response = tokenizer.encode(example.response) + [tokenizer.eod_id]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def _encode_chat(tokenizer: Tokenizer, example: Example, span_of) -> tuple[list[int], list[int]]:
    nl = tokenizer.encode("\n")

    def head(role: str) -> list[int]:
        return [tokenizer.im_start_id] + tokenizer.encode(role) + nl

    ids = head("system") + content_ids(tokenizer, example.system, span_of) + [tokenizer.im_end_id]
    labels = [IGNORE_INDEX] * len(ids)
    for user, reply in example.turns:
        asked = nl + head("user") + content_ids(tokenizer, user, span_of) + [tokenizer.im_end_id] + nl + head(
            "assistant")
        said = tokenizer.encode(reply, allowed_special=AUDIO_SPECIAL_TOKENS) + [tokenizer.im_end_id]
        ids += asked + said
        labels += [IGNORE_INDEX] * len(asked) + said
    return ids, labels


def collate(tokenizer: Tokenizer, examples: Sequence[Example], clips: Sequence[Sequence[Tensor]],
            span_of: Callable[[Tensor], int]) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, labels, attention_mask) of a batch, right-padded with <|endoftext|> (labels IGNORE_INDEX and mask
    0 there), as training reads it: every row starts at position 0. `clips[i]` are example i's loaded clips."""
    rows = []
    for example, own in zip(examples, clips):
        lengths = {str(path): span_of(clip) for path, clip in zip(example.audio, own)}
        rows.append(encode(tokenizer, example, lengths.__getitem__))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.eod_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)], labels[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), torch.tensor(lab), 1
    return input_ids, labels, mask


# ------------------------------------------------------------------------------------------------------- training

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
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    activation_checkpointing: bool = True
    lora: LoraConfig | None = None  # train a LoRA adapter (everything else frozen) instead of `part`
    # "bf16": the forward under bf16 autocast, weights, gradients and AdamW state kept in fp32; "auto": bf16 on GPUs
    # that run it, fp32 elsewhere (on CPUs bf16 is fast only with AVX-512 BF16, and exact fp32 is what tests compare)
    precision: str = "auto"
    shard: bool = False  # under torchrun, FSDP: weights, gradients and AdamW state split over the processes
    eval_every: int = 0  # steps between evaluations of the eval examples; 0: with each checkpoint
    eval_task: str | None = None  # also score greedy replies to the eval examples by this task's official metrics

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise InputError(f"part must be one of {', '.join(PARTS)}, got {self.part!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.eval_task is not None and self.eval_task not in evaluation.TASKS:
            raise InputError(f"unknown eval task {self.eval_task!r}; choose from {', '.join(evaluation.TASKS)}")
        if self.shard and self.lora:
            raise InputError("shard (--fsdp) splits full fine-tuning's weights over the processes; a LoRA adapter is "
                             "small enough to train data-parallel: leave it off")
        if self.shard and self.eval_task:
            raise InputError("eval_task (--eval-task) with shard (--fsdp): a sharded model computes only with every "
                             "process in step, and each process's replies end at their own length; score the result "
                             "with `qwenaudio evaluate` instead (eval_loss is still computed)")
        for name in ("steps", "batch_size", "accumulate"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


# Settings a resumed run may change: they do not change what is learned.
RESUMABLE_CHANGES = ("steps", "save_every", "shard", "eval_every", "eval_task")


def trainable(model: QwenAudio, part: str) -> dict[str, nn.Parameter]:
    """The parameters `part` trains, by official tensor name; every other parameter is frozen. `projection` is the
    audio encoder's output side (ln_post, proj and the BOS/EOS rows), which maps Whisper's features into the
    decoder's space."""
    chosen: dict[str, nn.Parameter] = {}
    for owner in ("encoder", "decoder"):
        for path, param in getattr(model, owner).named_parameters():
            train = part in ("all", owner) or (part == "projection" and owner == "encoder" and path.startswith(
                ("ln_post.", "proj.", "audio_bos_eos_token.")))
            param.requires_grad_(train)
            if train:
                chosen[official_name(owner, path)] = param
    return chosen


def plan_order(examples: Sequence[Example], config: TrainConfig) -> Iterator[list[int]]:
    """Batches of example indices, epoch after epoch: each epoch shuffled with `seed + epoch`, then batched by
    length within windows of 16 batches (so a batch pads little while the order stays random), the batches of an
    epoch shuffled again. The same settings always give the same order, which is what lets a run resume."""
    lengths = _lengths(examples)
    window = 16 * config.batch_size
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(config.seed + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()
        epoch_batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            epoch_batches += [chunk[i : i + config.batch_size] for i in range(0, len(chunk), config.batch_size)]
        yield from (epoch_batches[i] for i in torch.randperm(len(epoch_batches), generator=generator).tolist())


def _lengths(examples: Sequence[Example]) -> list[float]:
    """A sort key for batching by length: seconds of audio plus characters of text."""
    return [sum(seconds(p) for p in e.audio) + len(e.response) + sum(len(u) + len(r) for u, r in e.turns)
            for e in examples]


def schedule(step: int, config: TrainConfig) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based): linear warmup, then cosine decay to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(model: QwenAudio, examples: Sequence[Example], output_dir: str | Path, config: TrainConfig = TrainConfig(),
          *, eval_examples: Sequence[Example] = (), resume: bool = False,
          progress: Callable[[dict[str, Any]], None] | None = None) -> list[float]:
    """Fine-tune `model` in place on `examples` with AdamW and the official loss (the parameters of `config.part`,
    or a LoRA adapter with `config.lora`, `qwenaudio.lora.save_adapter` to keep it); returns every step's loss.

    With `accumulate` > 1 the forward passes of a step are weighted by their label tokens, so a step's loss and
    gradients are those of one batch of all its examples. Under torchrun each process takes every world-th batch
    of a step and `parallel.wrap` averages the gradients (DistributedDataParallel, or FSDP with `shard`, after
    which the model's parameters stay sharded: `save_model` gathers them), so N processes take the steps one
    process would take with `accumulate` × N.

    Every `save_every` steps and at the end, the trained parameters, the optimizer, the schedule, torch's random
    state and the losses go to `output_dir/checkpoint` (built aside and renamed, so the last one written is always
    whole); `resume` continues from there with the same data order, to the same losses. A new run seeds torch's
    generator with `seed` (LoRA's initial weights, dropout). Each step appends a record to
    `output_dir/metrics.jsonl` (and to TensorBoard's `output_dir/tensorboard` when tensorboard is installed), with
    `eval_loss` (and `eval_task`'s scores) over `eval_examples` every `eval_every` steps. A loss that is not finite
    stops the run with TrainingError before the update, the last checkpoint kept."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if config.eval_task:
        reply_languages(eval_examples, config.eval_task)  # refuse what cannot be scored before training
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
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
    params = trainable(model, config.part) if config.lora is None else lora_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, config))
    losses = _restore(output_dir / "checkpoint", params, optimizer, scheduler, config) if resume else []
    log = _Log(output_dir, done=len(losses)) if rank == 0 else None  # every process knows the same; one writes
    per_step = config.accumulate * world
    order = plan_order(examples, config)
    for _ in range(len(losses) * per_step):  # the batches already learned from
        next(order)
    every = config.eval_every or config.save_every
    started = time.monotonic()
    try:
        for step in range(len(losses), config.steps):
            batches = [[examples[i] for i in next(order)] for _ in range(per_step)][rank::world]
            loss, tokens = _step(engine, model, batches, params, optimizer, config, step, output_dir, world)
            scheduler.step()
            losses.append(loss)
            done = step + 1
            record = {"step": done, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                      "seconds": time.monotonic() - started}
            if eval_examples and (done == config.steps or every and done % every == 0):
                record |= _validate(engine, model, eval_examples, config, rank, world)
            if log:
                log.write(record)
                if progress:
                    progress(record)
            if done == config.steps or (config.save_every and done % config.save_every == 0):
                _save(output_dir / "checkpoint", params, optimizer, scheduler, losses, config, write=rank == 0)
    finally:
        if log:
            log.close()
    if world > 1:
        dist.barrier()  # the last checkpoint is written before any process returns
    return losses


def _prepare(model: QwenAudio, batch: Sequence[Example]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(input_ids, labels, attention_mask, clips) of a batch, its clips loaded."""
    clips = [[load_audio(p) for p in e.audio] for e in batch]
    ids, labels, mask = collate(model.tokenizer, batch, clips, lambda c: audio_span(len(c)))
    return ids, labels, mask, [c for row in clips for c in row]


def _label_count(labels: Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _autocast(model: QwenAudio, config: TrainConfig) -> torch.autocast:
    device = model.device
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _step(engine: nn.Module, model: QwenAudio, batches: list[list[Example]], params: dict[str, nn.Parameter],
          optimizer, config: TrainConfig, step: int, output_dir: Path, world: int) -> tuple[float, int]:
    """One optimizer step over this process's `batches` (of the step's `accumulate` × `world`); returns the step's
    loss, token-weighted over every process's batches, and their label tokens. Each batch's loss is weighted by its
    share of all the step's label tokens (times `world`, as the engine averages over the processes), so every
    process takes the step one process would take on all the batches."""
    optimizer.zero_grad(set_to_none=True)
    prepared = [_prepare(model, batch) for batch in batches]
    counts = [_label_count(labels) for _, labels, _, _ in prepared]
    total = int(_everywhere(torch.tensor([float(sum(counts))]), world))
    value, bad = 0.0, []
    for k, (batch, inputs, count) in enumerate(zip(batches, prepared, counts)):
        with parallel.syncing(engine, k == len(prepared) - 1):
            with _autocast(model, config):
                loss = engine(*inputs)
            if not torch.isfinite(loss):
                bad.append(f"{', '.join(e.where for e in batch)}: loss {loss.item()}")
            # backward even so: every process must take part in each gradient exchange; nothing is applied below
            (loss * (count * world / total)).backward()
        value += loss.item() * count / total
    value, failures = _everywhere(torch.tensor([value, float(len(bad))], dtype=torch.float64), world).tolist()
    if failures:
        where = "; ".join(bad) or "in another process"
        raise TrainingError(f"step {step + 1}: the loss is not finite (batch {where}); nothing was updated and the "
                            f"last checkpoint in {output_dir / 'checkpoint'} is kept")
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
    optimizer.step()
    return value, total


def _everywhere(values: Tensor, world: int) -> Tensor:
    """`values` summed over the processes (unchanged in a single process)."""
    if world > 1:
        dist.all_reduce(values)
    return values


def _validate(engine: nn.Module, model: QwenAudio, examples: Sequence[Example], config: TrainConfig, rank: int,
              world: int) -> dict[str, Any]:
    """`eval_loss`, the official loss over all of `examples` (token-weighted, as a training step's), and with
    `eval_task` each score of the greedy replies, `eval_<score>`. In eval mode: no dropout, and the model as
    inference runs it. Each process takes every world-th batch."""
    lengths = _lengths(examples)
    ordered = sorted(range(len(examples)), key=lengths.__getitem__)
    batches = [[examples[i] for i in ordered[k : k + config.batch_size]]
               for k in range(0, len(ordered), config.batch_size)]
    mine = batches[rank::world]
    # Sharded, every process gathers each block's weights together: all take as many passes, weightless if need be.
    sharded = config.shard and world > 1
    passes = mine + batches[: -(-len(batches) // world) - len(mine)] if sharded else mine
    loss_of = engine if sharded else model.loss  # DDP's forward belongs to training
    model.eval()
    try:
        total, tokens = 0.0, 0
        with torch.no_grad():
            for k, batch in enumerate(passes):
                ids, labels, mask, clips = _prepare(model, batch)
                count = _label_count(labels) if k < len(mine) else 0
                with _autocast(model, config):
                    total += loss_of(ids, labels, mask, clips).item() * count
                tokens += count
        total, tokens = _everywhere(torch.tensor([total, float(tokens)], dtype=torch.float64), world).tolist()
        result: dict[str, Any] = {"eval_loss": total / tokens, "eval_tokens": int(tokens)}
        if config.eval_task:
            result |= _reply_scores(model, mine, config.eval_task, world)
        return result
    finally:
        model.train()


def reply_languages(examples: Sequence[Example], task: str) -> list[str | None]:
    """The language each example's reply is scored in as `task` (the spoken one of an ASR or SRWT prompt, the
    target of a translation; None where the task's score needs none). Only task-form examples have one prompt to
    reply to; anything else is refused, naming the line."""
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
        elif named[0] not in scoring.LANGUAGES:
            raise InputError(f"{example.where}: {task} is scored in {' or '.join(scoring.LANGUAGES)} only, not "
                             f"{named[0]!r}")
        else:
            languages.append(named[0])
    return languages


def _reply_scores(model: QwenAudio, batches: list[list[Example]], task: str, world: int) -> dict[str, Any]:
    """Greedy replies to this process's `batches` with the official evaluation's decoding, scored over every
    process's replies as `evaluation.source_scores` scores one source."""
    records = []
    for batch in batches:
        clips = [[load_audio(p) for p in e.audio] for e in batch]
        replies = evaluation.generate_replies(model, [e.prompt for e in batch], clips,
                                              evaluation.TASKS[task].max_new_tokens)
        for e, reply, language in zip(batch, replies, reply_languages(batch, task)):
            source = Path(e.where.rsplit(":", 1)[0]).stem  # the data file's name, as a source's in evaluation
            records.append({"reference": e.response, "reply": reply, "language": language, "source": source})
    everyone = [record for part in gather(records, world) for record in part]
    scores, notes = evaluation.source_scores(task, everyone)
    return {**{f"eval_{name}": value for name, value in scores.items()}, **({"eval_notes": notes} if notes else {})}


class _Log:
    """Each step's record as a line of `metrics.jsonl` and, when tensorboard is installed, as scalars in
    `tensorboard/` (train/loss, train/lr, …, eval/loss, eval/wer, …). Steps after `done`, which a resumed run takes
    again, are dropped from both first."""

    def __init__(self, output_dir: Path, done: int):
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.endswith("}") and json.loads(line)["step"] <= done]
            write_text(self.path, "".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.board = None
        else:
            self.board = SummaryWriter(str(output_dir / "tensorboard"), purge_step=done + 1)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.board:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    name = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                    self.board.add_scalar(name, value, record["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board:
            self.board.close()


def _save(directory: Path, params: dict[str, nn.Parameter], optimizer, scheduler, losses: list[float],
          config: TrainConfig, *, write: bool) -> None:
    """The run so far, built aside and swapped in whole: a crash while saving leaves the previous checkpoint.
    Sharded tensors are gathered whole (every process calls this), so a run resumes on any number of processes;
    only `write` writes."""
    tensors = {name: parallel.full(p.detach()).contiguous() for name, p in params.items()}
    state = optimizer.state_dict()
    state["state"] = {i: {k: parallel.full(v) for k, v in s.items()} for i, s in state["state"].items()}
    if not write:
        return
    with building(directory, replace=True) as partial:
        save_file(tensors, str(partial / "trainable.safetensors"))
        torch.save({"optimizer": state, "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
                   partial / "state.pt")
        write_text(partial / "progress.json", json.dumps({"losses": losses, "config": asdict(config)}, indent=1))


def _restore(directory: Path, params: dict[str, nn.Parameter], optimizer, scheduler, config: TrainConfig
             ) -> list[float]:
    if not (directory / "progress.json").is_file():
        raise InputError(f"nothing to resume: {directory} holds no checkpoint")
    saved = json.loads((directory / "progress.json").read_text(encoding="utf-8"))
    now = json.loads(json.dumps(asdict(config)))  # as saved: tuples become lists
    changed = [k for k, v in now.items() if k not in RESUMABLE_CHANGES and saved["config"].get(k) != v]
    if changed:
        raise InputError(f"{directory} was trained with other settings ({', '.join(changed)}); resume with the "
                         "same ones, or start in another directory")
    tensors = load_file(str(directory / "trainable.safetensors"))
    if set(tensors) != set(params):
        raise InputError(f"{directory} holds other parameters than part {config.part!r} trains")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(parallel.shard_like(param, tensors[name].to(param.dtype)))
    state = torch.load(directory / "state.pt", weights_only=True)
    for i, param in enumerate(params.values()):  # whole moments, cut into this process's shards
        moments = state["optimizer"]["state"].get(i, {})
        for key, value in moments.items():
            if value.shape == param.shape:
                moments[key] = parallel.shard_like(param, value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # `steps` may have grown: today's schedule
        group["lr"] = base * schedule(len(saved["losses"]), config)
    return saved["losses"]


def save_model(model: QwenAudio, source: str | Path, target: str | Path) -> Path:
    """The fine-tuned model as a checkpoint in the official layout at `target` (a new directory, built aside and
    renamed): every tensor under its official name, and the other files of `source` (config, vocabulary,
    generation config) copied, so `qwenaudio.load(target)` and the official code read it like the original.
    Under torchrun every process calls it (a sharded model's tensors are gathered whole) and process 0 writes."""
    source, target = Path(source), Path(target)
    state = {official_name(owner, name): parallel.full(tensor) for owner in ("encoder", "decoder")
             for name, tensor in getattr(model, owner).state_dict().items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return target
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} exists and is not empty: the fine-tuned model goes to a new directory")
    with building(target, replace=target.exists()) as partial:
        save_checkpoint(state, partial)
        for file in source.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name != INDEX_FILE:
                shutil.copyfile(file, partial / file.name)
    return target
