"""Fine-tuning data: JSON Lines files of examples turned into token ids and labels for `QwenAudio.loss`.

Three forms are read, one example a line, audio paths relative to the file:
- task form, for the base model: `{"audio": "a.flac", "prompt": "<|startoftranscript|>…<|wo_itn|>", "response": "…"}`,
  or `"task": "asr"` (and `"language"`, or a `source` naming the dataset, …) instead of the prompt, to use the
  official evaluation's tags for one of `evaluation.BENCHMARKS`; the official evaluation files' `{"audio", "gt", …}`
  rows also work when the task is given for the whole file. The model reads `<audio>PATH</audio>` + prompt and
  learns the response and the `<|endoftext|>` after it;
- chat form, for Qwen-Audio-Chat: `{"messages": [{"role": "user", "content": [{"audio": "a.wav"}, {"text": "…"}]},
  {"role": "assistant", "content": "…"}, …]}` (an optional first `system` message), rendered as the official
  ChatML context (`prompts.render_chat`, `Audio 1:` labels per turn); the model learns each assistant reply and its
  `<|im_end|>`, nothing else. Text may also hold the official inline form that `tokenizer.from_list_format` writes,
  `"Audio 1:<audio>a.wav</audio>\nwhat is it?"`;
- ms-swift's form: `{"messages": [{"role": "user", "content": "<audio>what is said?"}, …], "audios": ["a.wav"]}`,
  each `<audio>` placeholder taking the next path of `audios`; read as the chat form.

Each family reads the examples its own way (`ENCODERS`): Qwen-Audio as above; Qwen2-Audio's base model reads
`<|audio_bos|><|AUDIO|><|audio_eos|>` + the prompt (a plain instruction: its task prompts are not Qwen-Audio's tags)
and learns the response and `<|endoftext|>`, and Qwen2-Audio-Instruct reads its chat template's ChatML, each clip
`Audio n: <|audio_bos|><|AUDIO|><|audio_eos|>\n` (n counted over the conversation), learning each reply and its
`<|im_end|>`.

Every line is checked when the file is read (JSON, fields, turns in order, clips that load as the model takes them
(`audio.as_waveform`: readable, finite, long enough for one audio token) and last at most 30 s, non-empty replies),
so a bad line is named by file and line before any training starts. Token ids
are made when a batch is put together, from the clips as loaded (a clip's span depends on its exact length).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import evaluation
from ..batch import seconds, shortest_clip
from ..prompts import DEFAULT_SYSTEM, audio_prompt, query_text, render_chat, render_qwen2_chat_ids
from ..core.audio import CHUNK_LENGTH, N_SAMPLES, SAMPLE_RATE, as_waveform
from ..core.checks import expect
from ..core.errors import AudioError, AudioTagError, InputError
from ..core.families import QWEN2_AUDIO, QWEN_AUDIO, Family, family_of
from ..core.model import IGNORE_INDEX, QwenAudio
from ..core.qwen2_tokenizer import AUDIO_REGION, Qwen2Tokenizer
from ..core.tokenizer import Tokenizer, audio_regions
from .config import TrainConfig


Turn = tuple[str, str]  # (user text with Audio n:<audio>path</audio> regions, assistant reply)


@dataclass(frozen=True)
class Example:
    """One checked line: a task-form prompt and response, or a conversation."""

    where: str  # "train.jsonl:3"
    audio: tuple[Path, ...]  # the clips, in the order of their <audio> regions
    prompt: str = ""  # task form: what the model reads, <audio>PATH</audio> and the tags
    response: str = ""  # task form: what it learns (then <|endoftext|>)
    task: str | None = None  # task form: the benchmark whose Qwen-Audio tag prompt was built (no "prompt" given)
    system: str = DEFAULT_SYSTEM  # chat form
    turns: tuple[Turn, ...] = ()  # chat form


def read_examples(path: str | Path, *, task: str | None = None, language: str | None = None,
                  family: Family | None = None) -> tuple[list[Example], list[str]]:
    """The examples of a JSON Lines file and one message per line that cannot be trained on, naming the file and
    line (blank lines are not examples). `task` reads rows without a prompt (the official evaluation files) as that
    task of `evaluation.BENCHMARKS`; `language` is the spoken language such rows need when they do not say it.
    `family` (the model's, where known) sets the shortest clip; None takes the shorter of the two families'."""
    expect(path, (str, Path), "path", "a JSON Lines file")
    expect(task, (str, type(None)), "task", "a task name or None")
    expect(language, (str, type(None)), "language", "a language tag or None")
    path = Path(path)
    if task is not None and task not in evaluation.BENCHMARKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(evaluation.BENCHMARKS)}")
    checked: dict[Path, str | None] = {}  # each clip's problem, found once however many lines name it

    def parse(row: Any, _: int, where: str) -> Example:
        if not isinstance(row, dict):
            raise InputError(f"expected a JSON object, got {type(row).__name__}")
        example = _chat(row, where, path.parent) if "messages" in row else _task(row, where, path.parent, task,
                                                                                 language)
        for clip in example.audio:
            if clip not in checked:
                checked[clip] = _clip_problem(clip, shortest_clip(family))
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
        if name not in evaluation.BENCHMARKS:
            raise InputError(f"no 'prompt' field and no task (give 'task' in the row or for the file): one of "
                             f"{', '.join(evaluation.BENCHMARKS)}, got {name!r}")
        missing = [f for f in ("source",) * (name == "st") + evaluation.BENCHMARKS[name].fields if f not in row]
        if missing:
            raise InputError(f"task {name} needs the field(s) {', '.join(missing)} to build its prompt")
        speech = evaluation.spoken_language(row, language) if evaluation.BENCHMARKS[name].speech else None
        prompt = evaluation.prompt(name, row, speech, "clotho")
    response = _text(row, "response" if "response" in row or "gt" not in row else "gt")
    clip = _resolve(root, audio)
    return Example(where, (clip,), prompt=audio_prompt(clip, prompt), response=response,
                   task=None if "prompt" in row else name)


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
    clips = _regions(system + "".join(user for user, _ in turns))  # in the order the model reads them
    return Example(where, tuple(map(Path, clips)), system=system, turns=tuple(turns))


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
    _regions(text)
    head, *regions = text.split("<audio>")  # each region: "PATH</audio>what follows"
    return head + "".join(f"<audio>{_resolve(root, path)}</audio>{after}"
                          for path, after in (region.split("</audio>") for region in regions))


def _regions(text: str) -> list[str]:
    """The paths of the `<audio>` regions of `text` (`audio_regions`), malformed tags refused as the data's error."""
    try:
        return audio_regions(text)
    except AudioTagError:
        raise InputError("an <audio> tag is not closed by </audio> (the inline form is <audio>PATH</audio>)") from None


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


def _clip_problem(clip: Path, min_samples: int) -> str | None:
    """Why a clip cannot be trained on, or None: it must load as the model takes it (`as_waveform`'s rules: a
    readable audio file, finite samples, long enough for one audio token), and last at most 30 s, since the model
    hears no more and a longer clip's reply would describe what it never hears."""
    try:
        wave = as_waveform(clip, str(clip), min_samples)
    except AudioError as e:
        return f"audio {e}"
    if len(wave) > N_SAMPLES:
        return f"audio {clip} lasts {len(wave) / SAMPLE_RATE:.1f} s; the model hears at most {CHUNK_LENGTH} s: cut it"
    return None


def as_examples(examples: Any, name: str, *, empty: bool = False) -> list[Example]:
    """`examples` as a list, refused unless it is a sequence of `Example`s (`read_examples` makes them), non-empty
    unless `empty` is allowed: training on nothing would wait forever for a first batch."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence) or not all(
            isinstance(e, Example) for e in examples):
        raise InputError(f"{name} must be a list of finetune.Example (from read_examples), got "
                         f"{type(examples).__name__} {examples!r:.80}")
    if not examples and not empty:
        raise InputError(f"{name} is empty: there is nothing to train on")
    return list(examples)


def encode(tokenizer: Tokenizer | Qwen2Tokenizer, example: Example, span_of: Callable[[str], int]
           ) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example, as the family of `tokenizer` reads it (`ENCODERS`); labels are
    IGNORE_INDEX wherever nothing is to be learned. `span_of(path)` gives each clip's audio span (the encoder's
    `span_length` of its length)."""
    expect(tokenizer, (Tokenizer, Qwen2Tokenizer), "tokenizer", "a qwenaudio tokenizer (model.tokenizer)")
    expect(example, Example, "example", "a finetune.Example (from read_examples)")
    if not callable(span_of):
        raise InputError(f"span_of must be a function of a clip's path, got {span_of!r:.80}")
    return ENCODERS[family_of(tokenizer)](tokenizer, example, span_of)


def _encode_qwen(tokenizer: Tokenizer, example: Example, span_of: Callable[[str], int]) -> tuple[list[int], list[int]]:
    """Qwen-Audio's: `<audio>PATH</audio>` + tags and the response, or Qwen-Audio-Chat's ChatML (`render_chat`)."""
    if example.turns:
        ids, labels, _ = render_chat(tokenizer, example.system, example.turns, span_of=span_of)
        return ids, labels
    prompt = tokenizer.encode(example.prompt, audio_spans=[span_of(p) for p in tokenizer.audio_paths(example.prompt)])
    response = tokenizer.encode(example.response) + [tokenizer.eod_id]
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


_REGION = re.compile(r"(?:Audio \d+:)?<audio>(.*?)</audio>\n?", re.DOTALL)  # a clip as `query_text` writes it
_TASK_TAGS = ("<|startoftranscript|>", "<|startofanalysis|>")  # Qwen-Audio's task prompts start with one


def _encode_qwen2(tokenizer: Qwen2Tokenizer, example: Example, span_of: Callable[[str], int]
                  ) -> tuple[list[int], list[int]]:
    """Qwen2-Audio's: the base model's `<|audio_bos|><|AUDIO|><|audio_eos|>` + prompt and the response then
    `<|endoftext|>`, or the Instruct chat template's ChatML learning each reply and its `<|im_end|>`
    (`prompts.render_qwen2_chat_ids`, the one rendering chat and training share). Special-token strings in the text
    are those tokens, as transformers' processor reads them."""
    spans = [span_of(str(path)) for path in example.audio]
    if not example.turns:
        if example.prompt.split("</audio>", 1)[-1].startswith(_TASK_TAGS):
            raise InputError(f"{example.where}: a Qwen-Audio task prompt (its tags) for a Qwen2-Audio model, whose "
                             "base model reads plain instructions: give the row a 'prompt' (e.g. \"Detect the "
                             "language and recognize the speech: <|en|>\")")
        prompt = tokenizer.encode(_REGION.sub(AUDIO_REGION, example.prompt), audio_spans=spans or None)
        response = tokenizer.encode(example.response) + [tokenizer.eod_id]
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response
    turns = [turn for user, reply in example.turns for turn in (("user", _parts(user)), ("assistant", reply))]
    rendered = render_qwen2_chat_ids(tokenizer, turns, audio_spans=spans, system=example.system)
    return rendered.ids, rendered.labels


def _parts(content: str) -> list[str | dict[str, str]]:
    """A user turn's text, with its clips as `query_text` writes them, back in parts: text and {"audio": path}."""
    parts: list[str | dict[str, str]] = []
    end = 0
    for region in _REGION.finditer(content):
        parts += [content[end : region.start()]] if region.start() > end else []
        parts.append({"audio": region.group(1)})
        end = region.end()
    return parts + ([content[end:]] if end < len(content) else [])


ENCODERS = {QWEN_AUDIO: _encode_qwen, QWEN2_AUDIO: _encode_qwen2}  # how each family reads an example


def collate(tokenizer: Tokenizer, examples: Sequence[Example], clips: Sequence[Sequence[Tensor]],
            span_of: Callable[[Tensor], int]) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, labels, attention_mask) of a batch, right-padded with <|endoftext|> (labels IGNORE_INDEX and mask
    0 there), as training reads it: every row starts at position 0. `clips[i]` are example i's loaded clips."""
    examples = as_examples(examples, "examples")
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


def plan_order(examples: Sequence[Example], config: TrainConfig) -> Iterator[list[int]]:
    """Batches of example indices, epoch after epoch: each epoch shuffled with `seed + epoch`, then batched by
    length within windows of 16 batches (so a batch pads little while the order stays random), the batches of an
    epoch shuffled again. The same settings always give the same order, which is what lets a run resume."""
    examples = as_examples(examples, "examples")  # none would be an endless search for a first batch
    expect(config, TrainConfig, "config", "a finetune.TrainConfig")
    return _order(length_keys(examples), config)


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


def length_keys(examples: Sequence[Example]) -> list[float]:
    """A sort key for batching by length: seconds of audio plus characters of text."""
    return [sum(seconds(p) for p in e.audio) + len(e.response) + sum(len(u) + len(r) for u, r in e.turns)
            for e in examples]


def batch_inputs(model: QwenAudio, batch: Sequence[Example]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(input_ids, labels, attention_mask, clips) of a batch, its clips loaded (a clip changed since it was checked
    is named)."""
    clips = [[load_clip(p, model.encoder.min_samples) for p in e.audio] for e in batch]
    ids, labels, mask = collate(model.tokenizer, batch, clips, lambda c: model.encoder.span_length(len(c)))
    return ids, labels, mask, [c for row in clips for c in row]


def load_clip(clip: Path, min_samples: int) -> Tensor:
    try:
        return as_waveform(clip, str(clip), min_samples)
    except AudioError as e:
        raise InputError(f"audio {e} (it was readable when the data was checked)") from None


def label_count(labels: Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
