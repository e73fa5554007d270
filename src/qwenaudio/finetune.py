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
  `<|im_end|>`, nothing else. Text may also hold the official inline form that `tokenizer.from_list_format` writes,
  `"Audio 1:<audio>a.wav</audio>\nwhat is it?"`;
- ms-swift's form: `{"messages": [{"role": "user", "content": "<audio>what is said?"}, …], "audios": ["a.wav"]}`,
  each `<audio>` placeholder taking the next path of `audios`; read as the chat form.

Every line is checked when the file is read (JSON, fields, turns in order, clips that load as the model takes them
(`audio.as_waveform`: readable, finite, long enough for one audio token) and last at most 30 s, non-empty replies),
so a bad line is named by file and line before any training starts. Token ids
are made when a batch is put together, from the clips as loaded (a clip's span depends on its exact length).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import pickle
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import evaluation, parallel, scoring
from .batch import seconds
from .chat import DEFAULT_SYSTEM, content_ids, query_text
from .core.audio import CHUNK_LENGTH, N_SAMPLES, SAMPLE_RATE, as_waveform, audio_span
from .core.checkpoint import INDEX_FILE, official_name, save_checkpoint
from .core.checks import expect, finite, whole
from .core.errors import AudioError, InputError, OutputError, TrainingError
from .core.files import building, write_text, writing
from .core.int8 import Int8Linear
from .core.model import IGNORE_INDEX, QwenAudio
from .core.tokenizer import AUDIO_SPECIAL_TOKENS, LANGUAGES, Tokenizer
from .lora import LoraConfig, apply_lora, lora_parameters
from .runner import gather

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
    expect(path, (str, Path), "path", "a JSON Lines file")
    expect(task, (str, type(None)), "task", "a task name or None")
    expect(language, (str, type(None)), "language", "a language tag or None")
    path = Path(path)
    if task is not None and task not in evaluation.TASKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(evaluation.TASKS)}")
    checked: dict[Path, str | None] = {}  # each clip's problem, found once however many lines name it

    def parse(row: Any, _: int, where: str) -> Example:
        if not isinstance(row, dict):
            raise InputError(f"expected a JSON object, got {type(row).__name__}")
        example = _chat(row, where, path.parent) if "messages" in row else _task(row, where, path.parent, task,
                                                                                 language)
        for clip in example.audio:
            if clip not in checked:
                checked[clip] = _clip_problem(clip)
            if checked[clip]:
                raise InputError(checked[clip])
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
    system, turns, user = DEFAULT_SYSTEM, [], None
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"message {k} must be {{'role': system|user|assistant, 'content': …}}, got "
                             f"{json.dumps(message, ensure_ascii=False)[:80]}")
        role, content = message["role"], message.get("content")
        if role == "system" and k == 0:
            system = _inline_audio(_text(message, "content"), root)
        elif role == "user" and user is None:
            parts = _swift_parts(content, pending, k) if pending is not None else content
            user = query_text(_user_parts(parts, root, k))
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
    clips = AUDIO_REGION.findall(system + "".join(user for user, _ in turns))  # in the order the model reads them
    return Example(where, tuple(map(Path, clips)), system=system, turns=tuple(turns))


AUDIO_REGION = re.compile(r"<audio>(.*?)</audio>", re.DOTALL)


def _user_parts(content: Any, root: Path, k: int) -> list:
    """A user message's content as `query_text` parts, every clip's path resolved against the data file's
    directory: a string, or a list of strings, `{"text": …}` and `{"audio": PATH}` parts."""
    parts = [content] if isinstance(content, str) else content if isinstance(content, list) else None
    if parts is None:
        raise InputError(f"message {k}: content must be a string or a list of {{'text': …}} and {{'audio': PATH}} "
                         f"parts, got {json.dumps(content, ensure_ascii=False)[:80]}")
    resolved = []
    for part in parts:
        if isinstance(part, dict) and "audio" in part:
            resolved.append({"audio": str(_resolve(root, part["audio"]))})
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            resolved.append({"text": _inline_audio(part["text"], root)})
        elif isinstance(part, str):
            resolved.append(_inline_audio(part, root))
        else:
            raise InputError(f"message {k}: a content part must be a string, {{'text': …}} or {{'audio': PATH}}, "
                             f"got {json.dumps(part, ensure_ascii=False)[:80]}")
    return resolved


def _inline_audio(text: str, root: Path) -> str:
    """Text in the official inline form (`from_list_format` writes `Audio 1:<audio>a.wav</audio>\n…`) with each
    region's path resolved as a clip part's is; an unclosed region is refused here, not at the step that reads it."""
    regions = AUDIO_REGION.findall(text)
    if text.count("<audio>") != len(regions) or text.count("</audio>") != len(regions):
        raise InputError("an <audio> tag is not closed by </audio> (the inline form is <audio>PATH</audio>)")
    return AUDIO_REGION.sub(lambda m: f"<audio>{_resolve(root, m.group(1))}</audio>", text)


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
    """An absolute path: the same clip has the same name however the data file was named (a resumed run keys on
    the examples)."""
    if not isinstance(audio, str) or not audio.strip():
        raise InputError(f"an audio path must be a non-empty string, got {audio!r}")
    return Path(os.path.abspath(root / Path(audio)))


def _clip_problem(clip: Path) -> str | None:
    """Why a clip cannot be trained on, or None: it must load as the model takes it (`as_waveform`'s rules: a
    readable audio file, finite samples, long enough for one audio token), and last at most 30 s, since the model
    hears no more and a longer clip's reply would describe what it never hears."""
    try:
        wave = as_waveform(clip, str(clip))
    except AudioError as e:
        return f"audio {e}"
    if len(wave) > N_SAMPLES:
        return f"audio {clip} lasts {len(wave) / SAMPLE_RATE:.1f} s; the model hears at most {CHUNK_LENGTH} s: cut it"
    return None


def _examples(examples: Any, name: str, *, empty: bool = False) -> list[Example]:
    """`examples` as a list, refused unless it is a sequence of `Example`s (`read_examples` makes them), non-empty
    unless `empty` is allowed: training on nothing would wait forever for a first batch."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not all(
            isinstance(e, Example) for e in examples):
        raise InputError(f"{name} must be a list of finetune.Example (from read_examples), got "
                         f"{type(examples).__name__} {examples!r:.80}")
    if not examples and not empty:
        raise InputError(f"{name} is empty: there is nothing to train on")
    return list(examples)


def encode(tokenizer: Tokenizer, example: Example, span_of: Callable[[str], int]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example; labels are IGNORE_INDEX wherever nothing is to be learned. `span_of(path)`
    gives each clip's audio span (`audio_span` of its length)."""
    expect(tokenizer, Tokenizer, "tokenizer", "a qwenaudio Tokenizer (model.tokenizer)")
    expect(example, Example, "example", "a finetune.Example (from read_examples)")
    if not callable(span_of):
        raise InputError(f"span_of must be a function of a clip's path, got {span_of!r:.80}")
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
    examples = _examples(examples, "examples")
    if not isinstance(clips, Sequence) or len(clips) != len(examples) or not all(
            isinstance(own, Sequence) and len(own) == len(e.audio) and all(isinstance(c, Tensor) for c in own)
            for e, own in zip(examples, clips)):
        raise InputError("clips must hold, for each example, a list of its loaded clips (waveform tensors)")
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
        if self.eval_task is not None and self.eval_task not in evaluation.TASKS:
            raise InputError(f"unknown eval task {self.eval_task!r}; choose from {', '.join(evaluation.TASKS)}")
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


def trainable(model: QwenAudio, part: str) -> dict[str, nn.Parameter]:
    """The parameters `part` trains, by official tensor name; every other parameter is frozen. `projection` is the
    audio encoder's output side (ln_post, proj and the BOS/EOS rows), which maps Whisper's features into the
    decoder's space."""
    expect(model, QwenAudio, "model", "a QwenAudio model (qwenaudio.load)")
    if part not in PARTS:
        raise InputError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
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
    examples = _examples(examples, "examples")  # none would be an endless search for a first batch
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    return _order(_lengths(examples), config)


def _order(lengths: list[float], config: TrainConfig) -> Iterator[list[int]]:
    window = 16 * config.batch_size
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(config.seed + epoch)
        order = torch.randperm(len(lengths), generator=generator).tolist()
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
    expect(step, int, "step", "an int (0-based optimizer step)")
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def run_inputs(examples: Sequence[Example], eval_examples: Sequence[Example] = (), **more: str) -> dict[str, str]:
    """What a run's result depends on besides its settings, as a checkpoint records it: a digest of the training
    and the held-out examples (their text and clip paths) and `more` (the command adds the base model's
    `files.fingerprint` and its dtype). A resume with other inputs is refused (`check_resume`)."""
    def digest(chosen: Sequence[Example]) -> str:
        rows = [[e.prompt, e.response, e.system, e.turns, [str(p) for p in e.audio]] for e in chosen]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()

    return {"examples": digest(_examples(examples, "examples")),
            "eval_examples": digest(_examples(eval_examples, "eval_examples", empty=True)), **more}


# What each recorded input is, for the message that refuses a resume.
INPUT_NAMES = {"examples": "the training examples (--data, or its clips' paths)",
               "eval_examples": "the held-out examples (--eval-data)",
               "model": "the base model's files (--model)", "weights": "the model's dtype (--dtype, --int8)"}


def check_resume(directory: str | Path, config: TrainConfig, inputs: Mapping[str, str]) -> dict[str, Any]:
    """The progress record of the checkpoint in `directory` (losses, settings, inputs), if resuming it with
    `config` and `inputs` continues the same run; else InputError naming each difference. Inputs the checkpoint
    did not record (one written before they were) are not compared."""
    expect(directory, (str, Path), "directory", "a checkpoint directory")
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    expect(inputs, Mapping, "inputs", "a mapping of input names to digests (run_inputs)")
    directory = Path(directory)
    try:
        saved = json.loads((directory / "progress.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"nothing to resume: {directory} holds no checkpoint") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{directory}/progress.json cannot be read ({e}): the checkpoint is damaged") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or not isinstance(
            saved.get("losses"), list):
        raise InputError(f"{directory}/progress.json is not a checkpoint's progress record: the checkpoint is damaged")
    now = json.loads(json.dumps(asdict(config)))  # as saved: tuples become lists
    changed = [k for k, v in now.items() if k not in RESUMABLE_CHANGES and saved["config"].get(k) != v]
    if changed:
        raise InputError(f"{directory} was trained with other settings ({', '.join(changed)}); resume with the "
                         "same ones, or start in another directory")
    recorded = saved.get("inputs", {})
    other = [INPUT_NAMES.get(k, k) for k, v in inputs.items() if k in recorded and recorded[k] != v]
    if other:
        raise InputError(f"{directory} was trained on other inputs: {'; '.join(other)} differ from what the run "
                         "began with; resume with the same ones, or start in another --output-dir")
    return saved


def train(model: QwenAudio, examples: Sequence[Example], output_dir: str | Path, config: TrainConfig = TrainConfig(),
          *, eval_examples: Sequence[Example] = (), resume: bool = False,
          progress: Callable[[dict[str, Any]], None] | None = None, inputs: Mapping[str, str] | None = None,
          saved: Callable[[int], None] | None = None) -> list[float]:
    """Fine-tune `model` in place on `examples` with AdamW and the official loss (the parameters of `config.part`,
    or a LoRA adapter with `config.lora`, `qwenaudio.lora.save_adapter` to keep it); returns every step's loss.

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
    checkpoint kept; a checkpoint or log that cannot be written (a full disk) is OutputError."""
    expect(model, QwenAudio, "model", "a QwenAudio model (qwenaudio.load)")
    examples = _examples(examples, "examples")
    eval_examples = _examples(eval_examples, "eval_examples", empty=True)
    expect(output_dir, (str, Path), "output_dir", "a directory path")
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    expect(resume, bool, "resume", "True or False")
    for name, function in (("progress", progress), ("saved", saved)):
        if function is not None and not callable(function):
            raise InputError(f"{name} must be a function or None, got {function!r:.80}")
    expect(inputs, (Mapping, type(None)), "inputs", "a mapping of input names to digests, or None")
    inputs = {**run_inputs(examples, eval_examples, weights=_weights(model)), **dict(inputs or {})}
    output_dir = Path(output_dir)
    if config.eval_task:
        reply_languages(eval_examples, config.eval_task)  # refuse what cannot be scored before training
    checkpoint = output_dir / "checkpoint"
    previous = check_resume(checkpoint, config, inputs)["losses"] if resume else None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{output_dir}: cannot make the output directory ({e.strerror or e})") from None
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
    losses = _restore(checkpoint, params, optimizer, scheduler, config, previous) if resume else []
    log = _Log(output_dir, done=len(losses)) if rank == 0 else None  # every process knows the same; one writes
    per_step = config.accumulate * world
    order = plan_order(examples, config)
    for _ in range(len(losses) * per_step):  # the batches already learned from
        next(order)
    every = config.eval_every or config.save_every
    started = last_save = time.monotonic()
    on_disk, writing_one = len(losses) if resume else None, False  # the step the checkpoint holds; a save under way
    logged, record = len(losses), None  # the last step in metrics.jsonl; the last step's record
    rng = _rng_state(model)  # torch's random state at the start of the next step: what a resume restores

    def save() -> None:
        _save(checkpoint, params, optimizer, scheduler, losses, config, rng, inputs, write=rank == 0)
        if saved and rank == 0:
            saved(len(losses))

    try:
        for step in range(len(losses), config.steps):
            batches = [[examples[i] for i in next(order)] for _ in range(per_step)][rank::world]
            loss, tokens = _step(engine, model, batches, params, optimizer, config, step, output_dir, world)
            done = step + 1
            with _deferred_interrupts():  # the update, the schedule and the record move together, or not at all
                record = {"step": done, "loss": loss, "lr": optimizer.param_groups[0]["lr"],  # this update's rate
                          "tokens": tokens, "seconds": time.monotonic() - started}
                optimizer.step()
                scheduler.step()
                losses.append(loss)
                rng = _rng_state(model)
            if eval_examples and (done == config.steps or every and done % every == 0):
                record |= _validate(engine, model, eval_examples, config, rank, world)
            if log:
                log.write(record)
                logged = done
                if progress:
                    progress(record)
            if done == config.steps or (config.save_every and done % config.save_every == 0) or _due(
                    last_save, config, rank, world):
                writing_one = True
                with _deferred_interrupts():  # Ctrl-C lets the checkpoint finish; a second one abandons it
                    save()
                on_disk, writing_one, last_save = done, False, time.monotonic()
    except KeyboardInterrupt:
        if log and record and logged != len(losses):
            log.write(record)  # interrupted before it was logged (while evaluating): logged without the eval scores
        if not writing_one and on_disk != len(losses) and not (config.shard and world > 1):
            save()  # the last whole step (the step under way, if any, is done again after the resume)
        raise
    finally:
        if log:
            log.close()
    if world > 1:
        dist.barrier()  # the last checkpoint is written before any process returns
    return losses


def _weights(model: QwenAudio) -> str:
    """The model's floating dtype, and whether its linears are int8: a resume on other weights learns otherwise."""
    dtype = next(model.decoder.parameters()).dtype
    return str(dtype).removeprefix("torch.") + (", int8 linears" if any(
        isinstance(m, Int8Linear) for m in model.decoder.modules()) else "")


def _rng_state(model: QwenAudio) -> dict[str, Tensor]:
    """torch's random state (the CPU generator's and, on a GPU, the device's: dropout draws there)."""
    state = {"rng": torch.get_rng_state()}
    if model.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(model.device)
    return state


def _due(last: float, config: TrainConfig, rank: int, world: int) -> bool:
    """Whether `save_minutes` have passed since the last checkpoint, by process 0's clock for every process (each
    process's own clock could disagree, and a checkpoint gathers from all of them)."""
    late = bool(config.save_minutes) and time.monotonic() - last >= 60 * config.save_minutes
    if world == 1:
        return late
    return bool(_everywhere(torch.tensor([float(late and rank == 0)]), world).item())


@contextmanager
def _deferred_interrupts() -> Iterator[None]:
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


def _prepare(model: QwenAudio, batch: Sequence[Example]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(input_ids, labels, attention_mask, clips) of a batch, its clips loaded (a clip changed since it was checked
    is named)."""
    clips = [[_load(p) for p in e.audio] for e in batch]
    ids, labels, mask = collate(model.tokenizer, batch, clips, lambda c: audio_span(len(c)))
    return ids, labels, mask, [c for row in clips for c in row]


def _load(clip: Path) -> Tensor:
    try:
        return as_waveform(clip, str(clip))
    except AudioError as e:
        raise InputError(f"audio {e} (it was readable when the data was checked)") from None


def _label_count(labels: Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _autocast(model: QwenAudio, config: TrainConfig) -> torch.autocast:
    device = model.device
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _step(engine: nn.Module, model: QwenAudio, batches: list[list[Example]], params: dict[str, nn.Parameter],
          optimizer, config: TrainConfig, step: int, output_dir: Path, world: int) -> tuple[float, int]:
    """The gradients of one optimizer step over this process's `batches` (of the step's `accumulate` × `world`),
    clipped, for `train` to apply; returns the step's loss, token-weighted over every process's batches, and their
    label tokens. Each batch's loss is weighted by its
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
        raise TrainingError(f"step {step + 1}: the loss is not finite (batch {where}); {_kept(output_dir)}")
    # the norm is needed even unclipped (max_norm inf scales by exactly 1): an overflowed norm made clipping scale
    # every gradient by 0, a step that silently changed nothing
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm or math.inf)
    if _everywhere(torch.tensor([float(not torch.isfinite(norm))]), world).item():
        raise TrainingError(f"step {step + 1}: the gradients are not finite (norm {norm.item()}; a learning rate or "
                            f"LoRA alpha too large?); {_kept(output_dir)}")
    return value, total


def _kept(output_dir: Path) -> str:
    """What a step stopped before its update leaves: the last checkpoint, if one was saved."""
    checkpoint = output_dir / "checkpoint"
    kept = f"the last checkpoint in {checkpoint} is kept" if checkpoint.is_dir() else "no checkpoint was saved yet"
    return f"nothing was updated and {kept}"


def _everywhere(values: Tensor, world: int) -> Tensor:
    """`values` summed over the processes (unchanged in a single process); nccl sums only on the GPU."""
    if world > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
        on = values.to(device)
        dist.all_reduce(on)
        values = on.to(values.device)
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
    examples = _examples(examples, "examples", empty=True)
    if task not in evaluation.TASKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(evaluation.TASKS)}")
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
        clips = [[_load(p) for p in e.audio] for e in batch]
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


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl record; infinity for a line that is not one (never kept)."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else math.inf


@contextmanager
def output_errors(what: Path) -> Iterator[None]:
    """A write that fails (a full disk: OSError, torch.save's RuntimeError "unexpected pos", safetensors'
    SafetensorError; a read-only directory) as one OutputError naming `what`."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if isinstance(e, OutputError):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else e
        raise OutputError(f"{what}: could not be written ({reason}); free space or choose another --output-dir. "
                          "Anything written before (the previous checkpoint) is kept") from None


def _finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """TrainingError naming the first tensor that holds NaN or infinity: such weights are never written."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TrainingError(f"{name} holds values that are not finite: {what} is not written (a learning rate "
                                "too high for these data?); the last checkpoint is kept")


def _save(directory: Path, params: dict[str, nn.Parameter], optimizer, scheduler, losses: list[float],
          config: TrainConfig, rng: dict[str, Tensor], inputs: Mapping[str, str], *, write: bool) -> None:
    """The run so far, built aside and swapped in whole: a crash, a full disk or Ctrl-C while saving leaves the
    previous checkpoint. Every file is written by `files.writing` (synced, the usual permissions). Sharded tensors
    are gathered whole (every process calls this), so a run resumes on any number of processes; only `write`
    writes. `rng` is torch's random state at the start of the next step."""
    tensors = {name: parallel.full(p.detach()).contiguous() for name, p in params.items()}
    state = optimizer.state_dict()
    state["state"] = {i: {k: parallel.full(v) for k, v in s.items()} for i, s in state["state"].items()}
    _finite(tensors, f"the checkpoint of step {len(losses)}")
    if not write:
        return
    with output_errors(directory), building(directory, replace=True) as partial:
        with writing(partial / "trainable.safetensors") as path:
            save_file(tensors, str(path))
        with writing(partial / "state.pt") as path:
            torch.save({"optimizer": state, "scheduler": scheduler.state_dict(), **rng}, path)
        write_text(partial / "progress.json", json.dumps({"losses": losses, "config": asdict(config),
                                                          "inputs": dict(inputs)}, indent=1))


def _restore(directory: Path, params: dict[str, nn.Parameter], optimizer, scheduler, config: TrainConfig,
             losses: list[float]) -> list[float]:
    """Load the checkpoint `check_resume` accepted (its `losses`) into the parameters, optimizer, schedule and
    torch's random state."""
    try:
        tensors = load_file(str(directory / "trainable.safetensors"))
        state = torch.load(directory / "state.pt", weights_only=True)
    except (OSError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
        raise InputError(f"{directory}: the checkpoint cannot be read ({e}); start in another --output-dir") from None
    if set(tensors) != set(params):
        raise InputError(f"{directory} holds other parameters than part {config.part!r} trains")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(parallel.shard_like(param, tensors[name].to(param.dtype)))
    for i, param in enumerate(params.values()):  # whole moments, cut into this process's shards
        moments = state["optimizer"]["state"].get(i, {})
        for key, value in moments.items():
            if value.shape == param.shape:
                moments[key] = parallel.shard_like(param, value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"], next(iter(params.values())).device)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # `steps` may have grown: today's schedule
        group["lr"] = base * schedule(len(losses), config)
    return losses


def save_model(model: QwenAudio, source: str | Path, target: str | Path) -> Path:
    """The fine-tuned model as a checkpoint in the official layout at `target` (a new directory, built aside and
    renamed): every tensor under its official name, and the other files of `source` (config, vocabulary,
    generation config) copied, so `qwenaudio.load(target)` and the official code read it like the original.
    Under torchrun every process calls it (a sharded model's tensors are gathered whole) and process 0 writes.
    Weights that are not finite are refused (TrainingError), a failed write is OutputError."""
    expect(model, QwenAudio, "model", "a QwenAudio model")
    expect(source, (str, Path), "source", "the base checkpoint's directory")
    expect(target, (str, Path), "target", "a directory path")
    source, target = Path(source), Path(target)
    state = {official_name(owner, name): parallel.full(tensor) for owner in ("encoder", "decoder")
             for name, tensor in getattr(model, owner).state_dict().items()}
    _finite(state, f"the model {target}")
    if dist.is_initialized() and dist.get_rank() != 0:
        return target
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} exists and is not empty: the fine-tuned model goes to a new directory")
    with output_errors(target), building(target, replace=target.exists()) as partial:
        save_checkpoint(state, partial)
        for file in source.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name != INDEX_FILE:
                shutil.copyfile(file, partial / file.name)
    return target
