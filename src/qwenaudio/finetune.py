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

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from torch import Tensor

from . import evaluation
from .chat import DEFAULT_SYSTEM, content_ids, query_text
from .core.audio import CHUNK_LENGTH
from .core.errors import InputError
from .core.model import IGNORE_INDEX
from .core.tokenizer import AUDIO_SPECIAL_TOKENS, Tokenizer

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
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the data file ({e})") from None
    examples, problems = [], []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(text)
            if not isinstance(row, dict):
                raise InputError(f"expected a JSON object, got {type(row).__name__}")
            example = (_chat(row, where, path.parent) if "messages" in row
                       else _task(row, where, path.parent, task, language))
            for clip in example.audio:
                _check_clip(clip, row)
            examples.append(example)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not a JSON object ({e.msg} at column {e.colno})")
        except InputError as e:
            problems.append(f"{where}: {e}")
    if not examples and not problems:
        raise InputError(f"{path}: no examples")
    return examples, problems


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
        speech = row.get("language", row.get("lang", language))
        prompt = evaluation.prompt(name, row, _speech_language(name, speech, row), "clotho")
    response = _text(row, "response" if "response" in row or "gt" not in row else "gt")
    clip = _resolve(root, audio)
    return Example(where, (clip,), prompt=f"<audio>{clip}</audio>{prompt}", response=response)


def _speech_language(task: str, language: str | None, row: dict) -> str | None:
    if not evaluation.TASKS[task].speech:
        return None
    if language is None:
        try:
            return evaluation._dataset_language(row.get("source", ""))
        except InputError:
            raise InputError(f"task {task} needs the spoken language: a 'language' field, or --language") from None
    return language


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


def _check_clip(clip: Path, row: dict) -> None:
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
