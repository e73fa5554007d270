"""Qwen-Audio-Chat: multi-turn ChatML conversations about one or more clips (docs/MODEL.md#chat).

The context is built exactly as the official `make_context`: a system piece, as many past turns as fit in
`max_window_size` tokens (newest first), then the new query and `<|im_start|>assistant\\n`. Every piece is encoded on
its own, with only Qwen-Audio's tags allowed as special tokens inside the content, so a user who types
"<|im_start|>" gets text, not a turn marker. The official chat re-runs the whole conversation every turn, encoding
all its clips as one batch; here the KV cache of the previous turn is reused when that gives the same logits: the
new context starts with the cached ids, and the earlier clips encode the same alongside the new ones (a short clip
batched with a longer one comes out slightly different, docs/MODEL.md#batching, and then everything is recomputed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .core.audio import as_waveform, audio_span
from .core.decoder import KVCache
from .core.checks import expect, expect_model, shown
from .core.errors import InputError
from .core.model import QwenAudio
from .core.tokenizer import AUDIO_SPECIAL_TOKENS, Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
Part = str | dict  # "text", {"text": "…"} or {"audio": path}
History = list[tuple[str, str]]


def query_text(parts: str | Sequence[Part]) -> str:
    """A query from parts: each clip becomes `Audio n:<audio>path</audio>\\n` (n from 1), text is appended as is."""
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, (list, tuple)):
        raise InputError(f"query must be a str or a list of parts (str, {{'text': …}}, {{'audio': path}}), got "
                         f"{shown(parts)}")
    out, n = "", 0
    for part in parts:
        if isinstance(part, str):
            out += part
        elif isinstance(part, dict) and "audio" in part:
            expect(part["audio"], (str, Path), "an audio part's path", "a str or Path")
            n += 1
            out += f"Audio {n}:<audio>{part['audio']}</audio>\n"
        elif isinstance(part, dict) and "text" in part:
            expect(part["text"], str, "a text part's text", "a str")
            out += part["text"]
        else:
            raise InputError(f"a query part must be a str, {{'text': …}} or {{'audio': path}}, got {part!r}")
    return out


def content_ids(tokenizer: Tokenizer, content: str, span_of) -> list[int]:
    """A message's text as ChatML holds it: only Qwen-Audio's audio tags are special (a typed "<|im_start|>" stays
    text), each `<audio>path</audio>` region given its clip's span by `span_of(path)`."""
    spans = [span_of(p) for p in tokenizer.audio_paths(content, allowed_special=AUDIO_SPECIAL_TOKENS)]
    return tokenizer.encode(content, allowed_special=AUDIO_SPECIAL_TOKENS, audio_spans=spans or None)


def build_context(tokenizer: Tokenizer, query: str, history: History, system: str, max_window_size: int,
                  span_of) -> tuple[str, list[int]]:
    """The official chat context: (raw text, ids). `span_of(path)` gives each clip's audio span."""
    nl = tokenizer.encode("\n")

    def piece(role: str, content: str) -> list[int]:
        body = content_ids(tokenizer, content, span_of)
        return [tokenizer.im_start_id] + tokenizer.encode(role) + nl + body + [tokenizer.im_end_id]

    system_ids = piece("system", system)
    kept_ids: list[int] = []
    kept_text = ""
    for turn_query, turn_reply in reversed(history):
        turn = nl + piece("user", turn_query) + nl + piece("assistant", turn_reply)
        if len(system_ids) + len(turn) + len(kept_ids) >= max_window_size:
            break
        kept_ids = turn + kept_ids
        kept_text = (f"\n<|im_start|>user\n{turn_query}<|im_end|>"
                     f"\n<|im_start|>assistant\n{turn_reply}<|im_end|>") + kept_text
    assistant = [tokenizer.im_start_id] + tokenizer.encode("assistant") + nl
    ids = system_ids + kept_ids + nl + piece("user", query) + nl + assistant
    raw = (f"<|im_start|>system\n{system}<|im_end|>{kept_text}"
           f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n")
    return raw, ids


class Chat:
    """A conversation with Qwen-Audio-Chat. `history` holds (query text, reply) pairs, oldest first.

    Each conversation keeps its own KV cache (about 0.5 MB a token for the full model in bf16), so that the next
    turn prefills only what is new."""

    def __init__(self, model: QwenAudio, system: str = DEFAULT_SYSTEM, history: History | None = None):
        expect_model(model)
        expect(system, str, "system", "a str (the system message)")
        self.model, self.system = model, system
        self.history: History = _checked_history(history)
        self._clips: dict[str, torch.Tensor] = {}
        self._cache = self._new_cache()  # the conversation so far, as the decoder has read it

    def reset(self) -> None:
        """Forget the conversation (the clips already read stay cached by path)."""
        self.history, self._cache = [], self._new_cache()

    def context(self, query: str | Sequence[Part]) -> tuple[str, list[int]]:
        """Raw text and ids the model would read for `query` after the current history."""
        window = self.model.generation_config.max_window_size
        return build_context(self.model.tokenizer, query_text(query), self.history, self.system, window,
                             lambda path: audio_span(len(self.clip(path))))

    def stream(self, query: str | Sequence[Part], **generation) -> Iterator[str]:
        """Yield the reply in text pieces; the turn joins the history once the reply is complete."""
        text = query_text(query)
        raw, ids = self.context(text)
        paths = self.model.tokenizer.audio_paths(raw, allowed_special=AUDIO_SPECIAL_TOKENS)
        pieces: list[str] = []
        for piece in self.model.stream(torch.tensor([ids]), [self.clip(p) for p in paths], cache=self._cache,
                                       **generation):
            pieces.append(piece)
            yield piece
        self.history.append((text, "".join(pieces)))

    def ask(self, query: str | Sequence[Part], **generation) -> str:
        """The whole reply to `query` (see `stream`)."""
        return "".join(self.stream(query, **generation))

    def _new_cache(self) -> KVCache:
        """An empty cache of one row; generation grows it as the conversation does."""
        weight = self.model.decoder.wte.weight
        return KVCache(self.model.config, 1, 0, weight.dtype, weight.device)

    def clip(self, path: str) -> torch.Tensor:
        """The clip at `path` as the conversation hears it, read once and kept by path; a missing or unreadable file
        raises AudioError here, so a caller can check a clip when it is attached, before any question."""
        expect(path, (str, Path), "path", "a str or Path")
        path = str(path)
        if path not in self._clips:
            self._clips[path] = as_waveform(Path(path), path)
        return self._clips[path]


def _checked_history(history: History | None) -> History:
    """A copy of `history` once it is known to be (query, reply) pairs of text, as `chat` returns it."""
    pairs = list(history) if isinstance(history, (list, tuple)) else None
    if history is not None and (pairs is None or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs)):
        raise InputError(f"history must be a list of (query, reply) pairs of str, as chat() returns it, got "
                         f"{shown(history)}")
    return [tuple(p) for p in pairs or []]


def chat(model: QwenAudio, query: str | Sequence[Part], history: History | None = None, *,
         system: str = DEFAULT_SYSTEM, **generation) -> tuple[str, History]:
    """One turn the official way, `model.chat(tokenizer, query, history)`: returns (reply, new history).
    Keep a `Chat` instead to reuse the KV cache between turns."""
    conversation = Chat(model, system, history)
    reply = conversation.ask(query, **generation)
    return reply, conversation.history
