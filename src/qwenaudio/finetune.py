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

from . import evaluation
from .batch import seconds
from .chat import DEFAULT_SYSTEM, content_ids, query_text
from .core.audio import CHUNK_LENGTH, audio_span, load_audio
from .core.checkpoint import INDEX_FILE, official_name, save_checkpoint
from .core.errors import InputError, TrainingError
from .core.files import building, write_text
from .core.model import IGNORE_INDEX, QwenAudio
from .core.tokenizer import AUDIO_SPECIAL_TOKENS, Tokenizer
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

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise InputError(f"part must be one of {', '.join(PARTS)}, got {self.part!r}")
        for name in ("steps", "batch_size", "accumulate"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


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
    lengths = [sum(seconds(p) for p in e.audio) + len(e.response) + sum(len(u) + len(r) for u, r in e.turns)
               for e in examples]
    window = 16 * config.batch_size
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(config.seed + epoch)
        order = torch.randperm(len(examples), generator=generator).tolist()
        epoch_batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
            epoch_batches += [chunk[i : i + config.batch_size] for i in range(0, len(chunk), config.batch_size)]
        yield from (epoch_batches[i] for i in torch.randperm(len(epoch_batches), generator=generator).tolist())


def schedule(step: int, config: TrainConfig) -> float:
    """The learning rate's multiplier at optimizer step `step` (0-based): linear warmup, then cosine decay to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(model: QwenAudio, examples: Sequence[Example], output_dir: str | Path, config: TrainConfig = TrainConfig(),
          *, resume: bool = False, progress: Callable[[dict[str, Any]], None] | None = None) -> list[float]:
    """Fine-tune `model` in place on `examples` with AdamW and the official loss (the parameters of `config.part`,
    or a LoRA adapter with `config.lora`, `qwenaudio.lora.save_adapter` to keep it); returns every step's loss.

    With `accumulate` > 1 the forward passes of a step are weighted by their label tokens, so a step's loss and
    gradients are those of one batch of all its examples. Every `save_every` steps and at the end, the trained
    parameters, the optimizer, the schedule, torch's random state and the losses go to `output_dir/checkpoint`
    (built aside and renamed, so the last one written is always whole); `resume` continues from there with the same
    data order, to the same losses. A new run seeds torch's generator with `seed` (LoRA's initial weights,
    dropout). Each step appends a line to `output_dir/metrics.jsonl`. A loss that is not finite stops the run with
    TrainingError before the update, the last checkpoint kept."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    model.decoder.activation_checkpointing = model.encoder.activation_checkpointing = config.activation_checkpointing
    if not resume:  # LoRA's initial A and its dropout draw from torch's generator; a resumed run restores it
        torch.manual_seed(config.seed)
    if config.lora is None:
        params = trainable(model, config.part)
    else:  # a model resumed or trained before already holds its adapter
        params = lora_parameters(model) or apply_lora(model, config.lora)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, config))
    losses: list[float] = []
    if resume:
        losses = _restore(output_dir / "checkpoint", params, optimizer, scheduler, config)
        _forget_metrics_after(output_dir / "metrics.jsonl", len(losses))  # steps done again after the checkpoint
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per_step = config.accumulate * world  # under torchrun each process takes every world-th batch of a step
    order = plan_order(examples, config)
    for _ in range(len(losses) * per_step):  # the batches already learned from
        next(order)
    started = time.monotonic()
    for step in range(len(losses), config.steps):
        batches = [[examples[i] for i in next(order)] for _ in range(per_step)][rank::world]
        loss, tokens = _step(model, batches, params, optimizer, config, step, output_dir, world)
        scheduler.step()
        losses.append(loss)
        record = {"step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                  "seconds": time.monotonic() - started}
        if rank == 0:  # every process holds the same parameters and losses; one writes them
            with open(output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if progress:
                progress(record)
            if step + 1 == config.steps or (config.save_every and (step + 1) % config.save_every == 0):
                _save(output_dir / "checkpoint", params, optimizer, scheduler, losses, config)
    if world > 1:
        dist.barrier()  # the last checkpoint is written before any process returns
    return losses


def _step(model: QwenAudio, batches: list[list[Example]], params: dict[str, nn.Parameter], optimizer,
          config: TrainConfig, step: int, output_dir: Path, world: int) -> tuple[float, int]:
    """One optimizer step over this process's `batches` (of the step's `accumulate` × `world`); returns the step's
    loss, token-weighted over every process's batches, and their label tokens. Each batch's gradient is weighted
    by its share of all the step's label tokens, and the processes' gradients are summed, so every process takes
    the step one process would take on all the batches."""
    optimizer.zero_grad(set_to_none=True)
    prepared = []
    for batch in batches:
        clips = [[load_audio(p) for p in e.audio] for e in batch]
        ids, labels, mask = collate(model.tokenizer, batch, clips, lambda c: audio_span(len(c)))
        prepared.append((ids, labels, mask, [c for row in clips for c in row]))
    counts = [int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels, _, _ in prepared]
    total = int(_everywhere(torch.tensor([float(sum(counts))]), world))
    value, bad = 0.0, []
    for batch, (ids, labels, mask, clips), count in zip(batches, prepared, counts):
        loss = model.loss(ids, labels, mask, clips)
        if not torch.isfinite(loss):
            bad.append(f"{', '.join(e.where for e in batch)}: loss {loss.item()}")
            continue
        (loss * count / total).backward()
        value += loss.item() * count / total
    value, failures = _everywhere(torch.tensor([value, float(len(bad))], dtype=torch.float64), world).tolist()
    if failures:
        where = "; ".join(bad) or "in another process"
        raise TrainingError(f"step {step + 1}: the loss is not finite (batch {where}); nothing was updated and the "
                            f"last checkpoint in {output_dir / 'checkpoint'} is kept")
    for param in params.values():
        if world > 1:
            dist.all_reduce(param.grad)
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
    optimizer.step()
    return value, total


def _everywhere(values: Tensor, world: int) -> Tensor:
    """`values` summed over the processes (unchanged in a single process)."""
    if world > 1:
        dist.all_reduce(values)
    return values


def _forget_metrics_after(path: Path, steps: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.endswith("}") and json.loads(line)["step"] <= steps]
        write_text(path, "".join(line + "\n" for line in kept))


def _save(directory: Path, params: dict[str, nn.Parameter], optimizer, scheduler, losses: list[float],
          config: TrainConfig) -> None:
    """The run so far, built aside and swapped in whole: a crash while saving leaves the previous checkpoint."""
    with building(directory, replace=True) as partial:
        save_file({name: p.detach().contiguous() for name, p in params.items()}, str(partial / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, partial / "state.pt")
        write_text(partial / "progress.json", json.dumps({"losses": losses, "config": asdict(config)}, indent=1))


def _restore(directory: Path, params: dict[str, nn.Parameter], optimizer, scheduler, config: TrainConfig
             ) -> list[float]:
    if not (directory / "progress.json").is_file():
        raise InputError(f"nothing to resume: {directory} holds no checkpoint")
    saved = json.loads((directory / "progress.json").read_text(encoding="utf-8"))
    now = json.loads(json.dumps(asdict(config)))  # as saved: tuples become lists
    changed = [k for k, v in now.items() if k not in ("steps", "save_every") and saved["config"].get(k) != v]
    if changed:
        raise InputError(f"{directory} was trained with other settings ({', '.join(changed)}); resume with the "
                         "same ones, or start in another directory")
    tensors = load_file(str(directory / "trainable.safetensors"))
    if set(tensors) != set(params):
        raise InputError(f"{directory} holds other parameters than part {config.part!r} trains")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    state = torch.load(directory / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # `steps` may have grown: today's schedule
        group["lr"] = base * schedule(len(saved["losses"]), config)
    return saved["losses"]


def save_model(model: QwenAudio, source: str | Path, target: str | Path) -> Path:
    """The fine-tuned model as a checkpoint in the official layout at `target` (a new directory, built aside and
    renamed): every tensor under its official name, and the other files of `source` (config, vocabulary,
    generation config) copied, so `qwenaudio.load(target)` and the official code read it like the original."""
    source, target = Path(source), Path(target)
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} exists and is not empty: the fine-tuned model goes to a new directory")
    state = {official_name(owner, name): tensor for owner in ("encoder", "decoder")
             for name, tensor in getattr(model, owner).state_dict().items()}
    with building(target, replace=target.exists()) as partial:
        save_checkpoint(state, partial)
        for file in source.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name != INDEX_FILE:
                shutil.copyfile(file, partial / file.name)
    return target
