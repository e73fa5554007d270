"""The OpenAI API as `qwenaudio serve` speaks it: requests read and checked, responses shaped.

Pure Python, no HTTP: `app` hands this module what a client sent (a multipart form's fields, a JSON body) and sends
back what it returns, so every rule of the API sits here and is tested without a server. A request the server
refuses is an `ApiError`: its status and OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
What the model does with a request is the library's (`tasks.perform`, `chat.Chat`); the task, language and option
checks are the library's too (`tasks.task_prompt`), said here with the field they came from.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.config import MIN_TEMPERATURE
from ..core.errors import QwenAudioError
from ..core.families import QWEN_AUDIO, Family
from ..core.qwen2_tokenizer import AUDIO
from ..core.tokenizer import AUDIO_SPECIAL_TOKENS
from ..prompts import family_tasks, query_text
from ..subtitles import to_srt, to_vtt
from ..tasks import Result, subtitle_cues, task_prompt

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}


class ApiError(Exception):
    """A request refused (4xx) or failed (5xx), with what OpenAI's error body says: the message, the request field
    at fault (`param`) and a machine-readable `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


# ---------------------------------------------------------------------------------------------------- the model name

def check_model(asked: Any, served: str, family: Family, *, aliases: bool) -> str | None:
    """The task a request's `model` names: None for the served name (or none given), an analysis for a task alias
    `NAME:TASK` (`aliases`: only the audio endpoints take them). Any other name is OpenAI's 404 model_not_found."""
    if asked is None or asked == served:
        return None
    if not isinstance(asked, str):
        raise invalid(f"model must be a string, got {type(asked).__name__}", "model")
    name, _, task = asked.partition(":")
    if aliases and name == served and task in alias_tasks(family):
        return task
    known = [served, *(f"{served}:{t}" for t in alias_tasks(family))] if aliases else [served]
    raise ApiError(404, f"the model {asked!r} does not exist: this server serves {', '.join(known)}", param="model",
                   code="model_not_found")


def alias_tasks(family: Family) -> tuple[str, ...]:
    """The analyses a model alias or the `task` field may name (the family's, `prompts.family_tasks`)."""
    return tuple(family_tasks(family).analyses)


# ---------------------------------------------------------------------------------- transcriptions and translations

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
STREAMED_FORMATS = ("json", "text")  # a stream carries text events, whatever else was asked
GRANULARITIES = ("segment", "word")
TRANSCRIPTION_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature",
                        "timestamp_granularities[]", "timestamp_granularities", "stream", "task")
TRANSLATION_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature", "stream",
                      "target_language")
TRANSLATION_SOURCE = "zh"  # `language` of a translation when none is given: OpenAI translates into English


@dataclass(frozen=True)
class AudioRequest:
    """A transcription or translation request, checked: the task by name (transcribe, translate, an analysis), its
    languages, the sampling temperature (0: greedy), the response format, whether to stream, and whether words are
    timed (`timed`: Qwen-Audio's timestamp prompt, for srt, vtt and words)."""

    task: str
    language: str | None
    target_language: str
    temperature: float
    response_format: str
    stream: bool
    words: bool
    timed: bool

    def generation(self) -> dict:
        """The sampling settings for `tasks.perform` (the task keeps its own budget and greedy decoding at 0)."""
        return {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {}


def parse_audio_request(fields: Mapping[str, Sequence[Any]], *, family: Family, served: str,
                        translation: bool) -> AudioRequest:
    """Check a multipart form's fields (name -> every value sent under it; the file is any non-str value) as
    /v1/audio/transcriptions (or, `translation`, /v1/audio/translations) reads them."""
    allowed = TRANSLATION_FIELDS if translation else TRANSCRIPTION_FIELDS
    unknown = [name for name in fields if name not in allowed]
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r}; this endpoint reads {', '.join(allowed)}", unknown[0])
    files = fields.get("file", [])
    if not files:
        raise invalid("the audio file is missing: send it as the multipart field 'file' (curl -F file=@clip.wav)",
                      "file")
    if len(files) > 1 or isinstance(files[0], str):
        raise invalid("'file' must be one uploaded file, sent with a filename (curl -F file=@clip.wav)", "file")
    one = {name: _single(fields, name) for name in allowed if name not in ("file", "timestamp_granularities[]",
                                                                          "timestamp_granularities")}
    task = check_model(one["model"], served, family, aliases=not translation)
    task = _task(one.get("task"), task, family) if not translation else "translate"
    if one["prompt"]:
        raise invalid("prompt is not supported: the recognition tasks read no text prompt; to ask about a clip in "
                      "your own words, use /v1/chat/completions", "prompt")
    fmt = one["response_format"] or "json"
    if fmt not in FORMATS:
        raise invalid(f"response_format must be one of {', '.join(FORMATS)}, got {fmt!r}", "response_format")
    stream = _flag(one["stream"], "stream")
    if stream and fmt not in STREAMED_FORMATS:
        raise invalid(f"stream=true sends transcript.text events: response_format must be json or text, got {fmt!r}",
                      "response_format")
    words = _granularities(fields, fmt, task, family)
    language, target = _languages(one, task, family, translation)
    timed = task == "transcribe" and family_tasks(family).timestamps and (words or fmt in ("srt", "vtt"))
    try:
        task_prompt(family, task, language=language, target_language=target, timestamps=timed)
    except QwenAudioError as e:  # a language the family has no tag for: the library's message names it
        raise invalid(str(e), "language" if repr(language) in str(e) else "target_language") from None
    return AudioRequest(task, language, target, _temperature(one["temperature"]), fmt, stream, words, timed)


def _single(fields: Mapping[str, Sequence[Any]], name: str) -> str | None:
    values = fields.get(name, [])
    if len(values) > 1:
        raise invalid(f"{name!r} was sent {len(values)} times; send it once", name)
    if values and not isinstance(values[0], str):
        raise invalid(f"{name!r} must be a text field, not a file", name)
    return values[0] if values else None


def _task(field_task: str | None, alias_task: str | None, family: Family) -> str:
    """The task a transcription asks for: the `task` field's (transcribe or an analysis) or the model alias's."""
    allowed = ("transcribe", *alias_tasks(family))
    if field_task is not None and field_task not in allowed:
        raise invalid(f"task must be one of {', '.join(allowed)} on {family.name}, got {field_task!r} (translate: "
                      "use /v1/audio/translations)", "task")
    if field_task is not None and alias_task is not None and field_task != alias_task:
        raise invalid(f"the model alias asks for task {alias_task!r} but the task field says {field_task!r}", "task")
    return field_task or alias_task or "transcribe"


def _flag(value: str | None, name: str) -> bool:
    if value is None or value.lower() == "false":
        return False
    if value.lower() == "true":
        return True
    raise invalid(f"{name} must be true or false, got {value!r}", name)


def _granularities(fields: Mapping[str, Sequence[Any]], fmt: str, task: str, family: Family) -> bool:
    """Whether words are asked for (`timestamp_granularities[]=word`), where that can be given."""
    asked = [*fields.get("timestamp_granularities[]", []), *fields.get("timestamp_granularities", [])]
    for value in asked:
        if value not in GRANULARITIES:
            raise invalid(f"timestamp_granularities[] must be segment or word, got {value!r}",
                          "timestamp_granularities[]")
    if not asked:
        return False
    if fmt != "verbose_json":
        raise invalid(f"timestamp_granularities[] needs response_format verbose_json, got {fmt!r}",
                      "timestamp_granularities[]")
    if "word" in asked and not family_tasks(family).timestamps:
        raise invalid(f"{family.name} has no word timestamps: leave out timestamp_granularities[]=word "
                      "(segments come with verbose_json)", "timestamp_granularities[]")
    if "word" in asked and task != "transcribe":
        raise invalid(f"word timestamps come only with task transcribe, not {task!r}", "timestamp_granularities[]")
    return "word" in asked


def _languages(one: Mapping[str, str | None], task: str, family: Family,
               translation: bool) -> tuple[str | None, str]:
    """(spoken language, output language): Qwen-Audio transcribes English unless told, Qwen2-Audio detects the
    language; a translation is from `language` (default zh) into `target_language` (default en)."""
    language, target = one["language"] or None, one.get("target_language") or None
    if task not in ("transcribe", "translate") and language is not None:
        raise invalid(f"language has no effect on task {task!r}: leave it out", "language")
    default = TRANSLATION_SOURCE if translation else ("en" if family is QWEN_AUDIO else None)
    return language or default, target or "en"


def _temperature(value: str | None) -> float:
    try:
        t = 0.0 if value is None or value == "" else float(value)
    except ValueError:
        raise invalid(f"temperature must be a number from 0 to 2, got {value!r}", "temperature") from None
    if not math.isfinite(t) or not 0 <= t <= 2:
        raise invalid(f"temperature must be from 0 to 2 (0: greedy), got {value}", "temperature")
    return _sampling_temperature(t)


def _sampling_temperature(t: float) -> float:
    """`t` once it is 0 (greedy) or a temperature the sampler can run (`GenerationConfig`'s floor)."""
    if 0 < t < MIN_TEMPERATURE:
        raise invalid(f"temperature must be 0 (greedy decoding) or from {MIN_TEMPERATURE} to 2, got {t}: a "
                      "smaller one is greedy in effect and overflows the sampler", "temperature")
    return t


def token_usage(prompt_tokens: int, output_tokens: int) -> dict:
    """A transcription's usage, as OpenAI reports it for token-billed models."""
    return {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens}


def audio_response(request: AudioRequest, result: Result, duration: float, usage: dict) -> tuple[Any, str]:
    """(body, media type) of a finished transcription or translation in the format asked for: a dict is JSON,
    a str is sent as it is. srt and vtt show `tasks.subtitle_cues` (as `qwenaudio transcribe` writes them)."""
    fmt = request.response_format
    if fmt == "json":
        return {"text": result.text, "usage": usage}, "application/json"
    if fmt == "text":
        return result.text + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        return to_srt(subtitle_cues(result.segments)), "text/plain; charset=utf-8"
    if fmt == "vtt":
        return to_vtt(subtitle_cues(result.segments)), "text/vtt; charset=utf-8"
    segments = [{"id": i, "seek": round(s.start * 100), "start": s.start, "end": s.end, "text": s.text,
                 "tokens": None, "temperature": request.temperature, "avg_logprob": None,
                 "compression_ratio": None, "no_speech_prob": None} for i, s in enumerate(result.segments)]
    body = {"task": request.task, "language": request.language, "duration": duration, "text": result.text,
            "segments": segments, "usage": usage}
    if request.words:
        body["words"] = [{"word": w.text, "start": w.start, "end": w.end} for w in result.words]
    return body, "application/json"


def transcript_delta(piece: str) -> dict:
    return {"type": "transcript.text.delta", "delta": piece}


def transcript_done(text: str, usage: dict) -> dict:
    return {"type": "transcript.text.done", "text": text, "usage": usage}


# ------------------------------------------------------------------------------------------------- chat completions

CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
               "n", "stream", "stream_options")
# OpenAI's other fields, which many clients send whatever they ask: the values that ask for nothing (null, always)
# are ignored, any other is refused as not supported. `user` and `metadata` only label a request: any of their kind.
NEUTRAL_FIELDS: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "logit_bias": ({},), "store": (False,),
    "service_tier": ("auto", "default"), "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False),
    "functions": ([],), "function_call": ("none",), "audio": (), "prediction": (), "reasoning_effort": (),
    "web_search_options": ()}
LABEL_FIELDS = {"user": str, "metadata": dict, "safety_identifier": str, "prompt_cache_key": str}
ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
MAX_STOPS = 4
DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


@dataclass(frozen=True)
class Clip:
    """An audio part of a chat request: its bytes (input_audio, a data: URL) or its remote URL, the name the
    conversation knows it by, and where it was in the request (for errors)."""

    name: str
    where: str
    data: bytes | None = None
    url: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request, checked, in the library's terms: the system message (None: the default), the
    (query, reply) history and the new query as `chat.Chat` takes them for `family`, the clips they name, and the
    settings."""

    system: str | None
    history: list[tuple[Any, str]]
    query: Any
    clips: list[Clip]
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool

    def generation(self) -> dict:
        """GenerationConfig settings (None keeps the checkpoint's): temperature 0 decodes greedily."""
        sampling = {} if self.temperature is None else (
            {"do_sample": False} if self.temperature == 0 else {"do_sample": True, "temperature": self.temperature})
        return {**sampling, "top_p": self.top_p, "stop_strings": self.stop, "seed": self.seed}


def parse_chat(body: Any, *, family: Family, served: str, context: int) -> ChatRequest:
    """Check a /v1/chat/completions JSON body for a model of `family` whose engine holds `context` tokens a row."""
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, got {_json_type(body)}")
    unknown = [name for name in body if name not in (*CHAT_FIELDS, *NEUTRAL_FIELDS, *LABEL_FIELDS)]
    if unknown:
        raise invalid(f"unsupported field {unknown[0]!r}; this server reads {', '.join(CHAT_FIELDS)}", unknown[0])
    body = {name: value for name, value in body.items() if value is not None}  # OpenAI's null: not given
    _ignored(body)
    check_model(body.get("model"), served, family, aliases=False)
    system, turns, clips = _messages(body.get("messages"), family)
    queries = [None if parts is None else _query(parts, family) for parts, _ in turns]
    history = [(q, reply) for q, (_, reply) in zip(queries[:-1], turns[:-1])]
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid("stream_options must be {\"include_usage\": true|false}, with stream true", "stream_options")
    if body.get("n", 1) != 1 or isinstance(body.get("n"), bool):
        raise invalid(f"n must be 1 (one reply per request), got {_brief(body['n'])}", "n")
    temperature = _number(body, "temperature", 0, 2, low_open=False)
    return ChatRequest(system, history, queries[-1], clips, _max_tokens(body, context),
                       temperature if temperature is None else _sampling_temperature(temperature),
                       _number(body, "top_p", 0, 1, low_open=True),
                       _stops(body.get("stop")), _seed(body.get("seed")), stream,
                       bool(options and _bool(options, "include_usage", "stream_options.include_usage")))


def _ignored(body: dict) -> None:
    """Refuse the fields of `NEUTRAL_FIELDS` and `LABEL_FIELDS` whose value asks for something."""
    for name, neutral in NEUTRAL_FIELDS.items():
        if name in body and not any(_same(body[name], value) for value in neutral):
            allowed = " or ".join(json.dumps(value) for value in neutral)
            raise invalid(f"{name} is not supported by this server: leave it out"
                          f"{f' or send {allowed}' if allowed else ''}, got {_brief(body[name])}", name)
    for name, kind in LABEL_FIELDS.items():
        if name in body and not isinstance(body[name], kind):
            raise invalid(f"{name} must be {_json_type(kind())}, got {_brief(body[name])}", name)


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality: false is not 0."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def _brief(value: Any) -> str:
    """A value from a JSON body as an error message shows it: as JSON, cut at 60 characters; one nested too deeply
    to write (Python's recursion limit, lower here than where the body was read) by its kind alone."""
    try:
        text = json.dumps(value)
    except (RecursionError, TypeError, ValueError):
        return _json_type(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _messages(messages: Any, family: Family) -> tuple[str | None, list[tuple[Any, str]], list[Clip]]:
    """(system text, [(user parts, assistant reply)] ending with the new query's parts and "", clips): an optional
    system message, then user and assistant messages, the last a user's.

    Messages of one role in a row are one message (`_joined`): a clip sent alone and the question after it are one
    turn, as in one message. A conversation that opens with the assistant's message is a first pair (None, reply),
    the reply's turn alone, as Qwen2-Audio's chat template renders it; Qwen-Audio's chat (the official
    `make_context`) pairs every reply with the user's message before it and cannot render one, so it is refused."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty array of {role, content} objects", "messages")
    system, clips, runs = None, [], []  # runs: (role, what each message of the run says, the first one's index)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(f"{where} must be an object whose role is one of {', '.join(ROLES)}", where)
        role, content = message["role"], message.get("content")
        if role in ("system", "developer"):
            if i != 0:
                raise invalid(f"{where}: a system message may only come first", where)
            system = _text_only(content, where, family)
            continue
        said = _user_parts(content, where, family, clips) if role == "user" else _text_only(content, where, family)
        if runs and runs[-1][0] == role:
            runs[-1][1].append(said)
        else:
            runs.append((role, [said], i))
    if not runs or runs[-1][0] != "user":
        raise invalid(f"messages[{len(messages) - 1}]: the last message must be the user's, to be answered",
                      "messages")
    if runs[0][0] == "assistant" and family is QWEN_AUDIO:
        where = f"messages[{runs[0][2]}]"
        raise invalid(f"{where}: a Qwen-Audio conversation cannot open with the assistant's message: its chat (the "
                      "official make_context) pairs each reply with the user's message before it", where)
    turns = [(None, _joined(runs.pop(0)[1]))] if runs[0][0] == "assistant" else []
    for role, said, _ in runs:
        if role == "user":
            turns.append((_joined(said), ""))
        else:
            turns[-1] = (turns[-1][0], _joined(said))
    return system, turns, clips


def _joined(contents: list[str | list]) -> str | list:
    """Messages of one role in a row as one: their parts in order (a str a text part), a newline between one
    message's text and the next one's (a clip ends its own line in both families' prompts)."""
    if len(contents) == 1:
        return contents[0]
    if all(isinstance(content, str) for content in contents):
        return "\n".join(contents)
    parts: list = []
    for content in contents:
        content = [{"text": content}] if isinstance(content, str) else content
        if parts and "text" in parts[-1] and "text" in content[0]:
            parts.append({"text": "\n"})
        parts += content
    return parts


def _text_only(content: Any, where: str, family: Family) -> str:
    """A system or assistant message's text (a str, or text parts joined)."""
    if isinstance(content, str):
        return _typed(content, f"{where}.content", family)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        text = "".join(_text_part(p, f"{where}.content[{k}]", family) for k, p in enumerate(content))
        return _typed(text, f"{where}.content", family)  # a tag split across parts is whole once they are joined
    raise invalid(f"{where}.content must be a string or an array of text parts", f"{where}.content")


def _user_parts(content: Any, where: str, family: Family, clips: list[Clip]) -> list | str:
    """A user message's content: its text, or its parts as the library takes them ({"text"}, {"audio": name})."""
    if isinstance(content, str):
        return _typed(content, f"{where}.content", family)
    if not isinstance(content, list) or not content:
        raise invalid(f"{where}.content must be a string or a non-empty array of parts", f"{where}.content")
    parts = []
    for k, part in enumerate(content):
        at = f"{where}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"text": _text_part(part, at, family)})
        elif kind in ("input_audio", "audio_url"):
            clips.append(_clip(part, kind, at, f"audio{len(clips) + 1}"))
            parts.append({"audio": clips[-1].name})
        else:
            raise invalid(f"{at} must be a part of type text, input_audio or audio_url, got "
                          f"{_brief(kind) if kind else repr(_json_type(part))}", at)
    _typed("".join(p["text"] for p in parts if "text" in p), f"{where}.content", family)  # as in _text_only
    return parts


def _text_part(part: dict, at: str, family: Family) -> str:
    if not isinstance(part.get("text"), str):
        raise invalid(f"{at}.text must be a string", f"{at}.text")
    return _typed(part["text"], f"{at}.text", family)


def _typed(text: str, at: str, family: Family) -> str:
    """Typed text, once it marks no clip's place: Qwen-Audio reads `<audio>PATH</audio>` as a clip to open (and a
    server must not read files its clients name: `chat.Chat` given clips refuses them too), Qwen2-Audio reads
    `<|AUDIO|>` in any message as a clip's audio. What else the library refuses in a query it says itself."""
    markers = sorted(AUDIO_SPECIAL_TOKENS) if family is QWEN_AUDIO else [AUDIO]
    marker = next((t for t in markers if t in text), None)
    if marker is not None:
        raise invalid(f"{at} holds {marker!r}, which {family.name} reads as a clip's place: send clips as "
                      "input_audio or audio_url parts", at)
    return text


def _clip(part: dict, kind: str, at: str, name: str) -> Clip:
    """An input_audio part ({"data": base64, "format"}) or an audio_url part ({"url": data: URL or http(s) URL})."""
    inner = part.get(kind)
    if kind == "input_audio":
        if not isinstance(inner, dict) or not isinstance(inner.get("data"), str):
            raise invalid(f"{at}.input_audio must be {{\"data\": base64, \"format\": \"wav\"}}", f"{at}.input_audio")
        if not isinstance(inner.get("format", "wav"), str):
            raise invalid(f"{at}.input_audio.format must be a string such as \"wav\"", f"{at}.input_audio.format")
        return Clip(name, at, data=_base64(inner["data"], f"{at}.input_audio.data"))
    url = inner.get("url") if isinstance(inner, dict) else inner
    if not isinstance(url, str):
        raise invalid(f"{at}.audio_url must be {{\"url\": \"data:audio/wav;base64,...\"}}", f"{at}.audio_url")
    if url.startswith("data:"):
        match = DATA_URL.fullmatch(url)
        if match is None or ";base64" not in match["params"]:
            raise invalid(f"{at}.audio_url.url must be a base64 data URL (data:audio/wav;base64,...)",
                          f"{at}.audio_url")
        return Clip(name, at, data=_base64(match["data"], f"{at}.audio_url.url"))
    if url.startswith(("http://", "https://")):
        return Clip(name, at, url=url)
    raise invalid(f"{at}.audio_url.url must be a data: URL (or, where the server allows, http(s)), got "
                  f"{url[:40]!r}", f"{at}.audio_url")


def _base64(text: str, at: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{at} is not valid base64", at) from None
    if not data:
        raise invalid(f"{at} is empty: it must hold an audio file", at)
    return data


def _query(parts: list | str, family: Family) -> Any:
    """A query as the family's chat history keeps it (`chat.Chat`): Qwen-Audio's text, Qwen2-Audio's parts."""
    return query_text(parts) if family is QWEN_AUDIO else parts


def _bool(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{param or name} must be true or false, got {_brief(value)}", param or name)
    return value


def _max_tokens(body: dict, context: int) -> int | None:
    """max_completion_tokens (or the older max_tokens): at least 1 and within a row's context."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(f"{name} must be a whole number, got {_brief(value)}", name)
    if value < 1:
        raise invalid(f"{name} must be at least 1, got {value}", name)
    if value >= context:
        raise invalid(f"{name} is {value}, but a request's prompt and reply share {context} tokens on this server",
                      name)
    return value


def _number(body: dict, name: str, low: float, high: float, *, low_open: bool) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low < value if low_open else low <= value) or value > high:
        span = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(f"{name} must be a number in {span}, got {_brief(value)}", name)
    return float(value)


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise invalid(f"stop must be a non-empty string or an array of at most {MAX_STOPS} of them", "stop")
    return tuple(stops)


def _seed(seed: Any) -> int | None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise invalid(f"seed must be a whole number from 0 to 2**63 - 1, got {_brief(seed)}", "seed")
    return seed


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id_: str, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}], "usage": usage}


def chat_chunk(id_: str, model: str, delta: dict, finish_reason: str | None = None, *,
               usage: dict | None = None) -> dict:
    """One chat.completion.chunk: a delta of the one choice, or (`usage`, no choices) the last of a stream that
    asked for stream_options.include_usage."""
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    chunk = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": choices}
    return {**chunk, "usage": usage} if usage is not None else chunk


def models_list(served: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                        "owned_by": "qwenaudio"}]}


# ------------------------------------------------------------------------------------------------------------ streams

class Deltas:
    """The new piece of a text re-read as it grows (a reply decoded so far), each time: what may still change is
    held back until the end (an incomplete character, decoded as U+FFFD, and a tail that could begin a stop
    string), so the pieces join into the final text."""

    def __init__(self, stop_strings: Sequence[str] = ()):
        self.stops, self.shown = tuple(stop_strings), ""

    def piece(self, text: str, *, final: bool = False) -> str:
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - _stop_prefix(text, self.stops)]
        if not text.startswith(self.shown):  # never taken back: the final text or the done event says it whole
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that a stop string starts with."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
